/*
 * Unit tests for agent/journal.c: round trips through real segment files in a fresh mkdtemp
 * directory per test, compression, rotation and release, a torn tail cut at every byte of the last
 * block, quarantine of corrupt and garbage segments, random damage that must never crash replay,
 * the quota, the fsync policies, the verify and status reports, and CRC32C's known answer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "journal.h"
#include "journaldir.h"

#define SEG_HDR 36 /* the sizes JOURNAL.md gives */
#define BLK_HDR 48
#define REC_HDR 5

/* ---- helpers ---------------------------------------------------------------- */

struct rec {
    uint8_t type;
    size_t len;
    uint8_t *data;
    uint64_t lsn;
};

struct recs {
    struct rec *v;
    size_t n, cap;
    size_t stop_at; /* the callback returns 7 on this record (1-based); 0: never */
};

static void recs_push(struct recs *r, uint8_t type, const void *data, size_t len, uint64_t lsn)
{
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 64;
        r->v = realloc(r->v, r->cap * sizeof *r->v);
        assert_non_null(r->v);
    }
    struct rec *x = &r->v[r->n++];
    x->type = type;
    x->len = len;
    x->lsn = lsn;
    x->data = malloc(len + 1);
    assert_non_null(x->data);
    if (len > 0)
        memcpy(x->data, data, len);
}

static void recs_free(struct recs *r)
{
    for (size_t i = 0; i < r->n; i++)
        free(r->v[i].data);
    free(r->v);
    memset(r, 0, sizeof *r);
}

static int collect(void *ctx, uint8_t type, const void *payload, size_t len, uint64_t lsn)
{
    struct recs *r = ctx;
    recs_push(r, type, payload, len, lsn);
    return r->stop_at != 0 && r->n == r->stop_at ? 7 : 0;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static uint8_t *random_bytes(size_t len)
{
    uint8_t *p = malloc(len + 1);
    assert_non_null(p);
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)rng();
    return p;
}

static void make_dir(char *dir)
{
    strcpy(dir, "/tmp/test_journal-XXXXXX");
    assert_non_null(mkdtemp(dir));
}

static void rm_rf(const char *dir)
{
    DIR *d = opendir(dir);
    char path[512];
    if (d == NULL)
        return;
    for (struct dirent *de; (de = readdir(d)) != NULL;) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        struct stat sb;
        if (lstat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
            rm_rf(path);
        else
            unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

static void path_of(char *out, const char *dir, const char *name)
{
    snprintf(out, 512, "%s/%s", dir, name);
}

static const char *seg(uint64_t lsn)
{
    static char name[64];
    snprintf(name, sizeof name, "seg-%016llx.tjl", (unsigned long long)lsn);
    return name;
}

static bool exists(const char *dir, const char *name)
{
    char p[512];
    path_of(p, dir, name);
    return access(p, F_OK) == 0;
}

static long long file_size(const char *dir, const char *name)
{
    char p[512];
    struct stat sb;
    path_of(p, dir, name);
    return stat(p, &sb) == 0 ? (long long)sb.st_size : -1;
}

/* Counts the directory's files whose names end with suffix. */
static int count_files(const char *dir, const char *suffix)
{
    DIR *d = opendir(dir);
    int n = 0;
    assert_non_null(d);
    for (struct dirent *de; (de = readdir(d)) != NULL;) {
        size_t a = strlen(de->d_name), b = strlen(suffix);
        if (a >= b && strcmp(de->d_name + a - b, suffix) == 0)
            n++;
    }
    closedir(d);
    return n;
}

static uint8_t *read_all(const char *dir, const char *name, size_t *len)
{
    char p[512];
    path_of(p, dir, name);
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(*len + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, *len, f), *len);
    fclose(f);
    return buf;
}

static void write_all(const char *dir, const char *name, const void *data, size_t len)
{
    char p[512];
    path_of(p, dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Offsets of the disk blocks of a segment image, read the way JOURNAL.md describes them. */
static size_t block_offsets(const uint8_t *seg_bytes, size_t len, size_t *offs, size_t max)
{
    size_t n = 0;
    for (size_t off = SEG_HDR; off + BLK_HDR <= len && n < max;) {
        const uint8_t *h = seg_bytes + off;
        uint32_t stored =
            (uint32_t)h[8] | (uint32_t)h[9] << 8 | (uint32_t)h[10] << 16 | (uint32_t)h[11] << 24;
        offs[n++] = off;
        off += BLK_HDR + stored;
    }
    return n;
}

static struct journal_config config(const char *dir)
{
    struct journal_config c = {.dir = dir, .fsync = JOURNAL_FSYNC_NEVER, .zstd_level = 1};
    return c;
}

static struct journal *jopen(const struct journal_config *c)
{
    struct journal *j = NULL;
    struct journal_error err = {{0}};
    int rc = journal_open(&j, c, &err);
    if (rc != 0)
        fail_msg("journal_open: %d %s", rc, err.message);
    return j;
}

static uint64_t put(struct journal *j, uint8_t type, const void *p, size_t len)
{
    uint64_t lsn = 0;
    assert_int_equal(journal_append(j, type, p, len, &lsn), 0);
    return lsn;
}

/* Seals and writes the open block. */
static void flush(struct journal *j)
{
    struct journal_error err = {{0}};
    struct journal_block *b = journal_seal(j);
    assert_non_null(b);
    int rc = journal_write_block(j, b, &err);
    if (rc != 0)
        fail_msg("journal_write_block: %d %s", rc, err.message);
    journal_block_free(b);
}

static void replay(const char *dir, struct recs *r, struct journal_replay_stats *st)
{
    struct journal_error err = {{0}};
    int rc = journal_replay(dir, collect, r, st, &err);
    if (rc != 0)
        fail_msg("journal_replay: %d %s", rc, err.message);
}

static void assert_lsns(const struct recs *r, uint64_t first, size_t n)
{
    assert_int_equal(r->n, n);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(r->v[i].lsn, first + i);
}

/* Appends n one-record blocks of len random bytes (kept in r, if given). */
static void put_blocks(struct journal *j, size_t n, size_t len, struct recs *r)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t *p = random_bytes(len);
        uint64_t lsn = put(j, (uint8_t)(1 + i % 200), p, len);
        if (r != NULL)
            recs_push(r, (uint8_t)(1 + i % 200), p, len, lsn);
        free(p);
        flush(j);
    }
}

static void assert_same(const struct recs *want, size_t from, const struct recs *got, size_t at,
                        size_t n)
{
    assert_true(got->n >= at + n);
    for (size_t i = 0; i < n; i++) {
        const struct rec *a = &want->v[from + i], *b = &got->v[at + i];
        assert_int_equal(a->lsn, b->lsn);
        assert_int_equal(a->type, b->type);
        assert_int_equal(a->len, b->len);
        assert_memory_equal(a->data, b->data, a->len);
    }
}

/* ---- tests ------------------------------------------------------------------ */

static void test_crc32c(void **state)
{
    (void)state;
    assert_int_equal(journal_crc32c(0, "123456789", 9), 0xE3069283u);
    assert_int_equal(journal_crc32c(0, "", 0), 0);
    uint8_t *p = random_bytes(1000);
    uint32_t whole = journal_crc32c(0, p, 1000);
    for (size_t cut = 0; cut <= 1000; cut += 37)
        assert_int_equal(journal_crc32c(journal_crc32c(0, p, cut), p + cut, 1000 - cut), whole);
    free(p);
}

static void test_roundtrip(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct journal_config c = config(dir);
    struct journal *j = jopen(&c);
    struct recs want = {0}, got = {0};
    static const size_t sizes[] = {0, 1, 1 << 20, 100, 0, 70000, 3, 1 << 20, 1 << 20, 42};
    uint64_t dummy;

    assert_null(journal_seal(j));
    assert_int_equal(journal_append(j, 0, "x", 1, &dummy), -EINVAL);
    assert_int_equal(journal_append(j, 1, NULL, 1, &dummy), -EINVAL);
    assert_int_equal(journal_append(j, 1, "x", (size_t)JOURNAL_RECORD_MAX + 1, &dummy), -EMSGSIZE);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uint8_t *p = random_bytes(sizes[i]);
        uint8_t type = (uint8_t)(i == 3 ? 255 : i + 1);
        uint64_t lsn = put(j, type, sizes[i] ? p : NULL, sizes[i]);
        assert_int_equal(lsn, i + 1);
        recs_push(&want, type, p, sizes[i], lsn);
        free(p);
        if (i == 2) { /* the rest goes in one sealed block of several disk blocks */
            struct journal_block *b = journal_seal(j);
            assert_int_equal(journal_block_first_lsn(b), 1);
            assert_int_equal(journal_block_last_lsn(b), 3);
            assert_int_equal(journal_block_records(b), 3);
            struct journal_error err;
            assert_int_equal(journal_write_block(j, b, &err), 0);
            assert_int_equal(journal_write_block(j, b, &err), 0); /* already written: no-op */
            journal_block_free(b);
        }
    }
    flush(j);
    journal_close(j);

    struct journal_replay_stats st;
    replay(dir, &got, &st);
    assert_lsns(&got, 1, want.n);
    assert_same(&want, 0, &got, 0, want.n);
    assert_int_equal(st.records, want.n);
    assert_int_equal(st.segments, 1);
    assert_int_equal(st.torn_tail_bytes, 0);
    assert_int_equal(st.quarantined, 0);
    assert_string_equal(st.last_problem, "");
    uint64_t bytes = 0;
    for (size_t i = 0; i < want.n; i++)
        bytes += want.v[i].len;
    assert_int_equal(st.bytes, bytes);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    assert_true(st.oldest_ms <= now && st.oldest_ms + 60000 > now);

    /* LSNs continue after reopen, in the same segment. */
    j = jopen(&c);
    struct journal_usage u;
    journal_usage(j, &u);
    assert_int_equal(u.next_lsn, want.n + 1);
    assert_int_equal(u.disk_bytes, (uint64_t)file_size(dir, seg(1)));
    assert_int_equal(u.pending_bytes, 0);
    for (int i = 0; i < 3; i++) {
        uint64_t lsn = put(j, 9, "again", 5);
        assert_int_equal(lsn, want.n + 1);
        recs_push(&want, 9, "again", 5, lsn);
    }
    journal_usage(j, &u);
    assert_int_equal(u.pending_bytes, 3 * (REC_HDR + 5));
    flush(j);
    journal_close(j);
    recs_free(&got);
    replay(dir, &got, &st);
    assert_lsns(&got, 1, want.n);
    assert_same(&want, 0, &got, 0, want.n);
    assert_int_equal(count_files(dir, ".tjl"), 1);

    recs_free(&want);
    recs_free(&got);
    rm_rf(dir);
}

static void test_compression(void **state)
{
    (void)state;
    char dirs[2][64];
    long long size[2];
    uint8_t payload[4096];
    for (size_t i = 0; i < sizeof payload; i++)
        payload[i] = (uint8_t)("metric/loss step=12 value=0.25 "[i % 31]);
    for (int level = 0; level < 2; level++) {
        make_dir(dirs[level]);
        struct journal_config c = config(dirs[level]);
        c.zstd_level = level;
        struct journal *j = jopen(&c);
        for (int i = 0; i < 200; i++)
            put(j, 1, payload, sizeof payload);
        flush(j);
        journal_close(j);
        size[level] = file_size(dirs[level], seg(1));
        struct recs got = {0};
        struct journal_replay_stats st;
        replay(dirs[level], &got, &st);
        assert_lsns(&got, 1, 200);
        for (size_t i = 0; i < got.n; i++)
            assert_memory_equal(got.v[i].data, payload, sizeof payload);
        recs_free(&got);
        rm_rf(dirs[level]);
    }
    /* Level 0 stores raw: header, one block header, the records themselves. */
    assert_int_equal(size[0], SEG_HDR + BLK_HDR + 200 * (REC_HDR + sizeof payload));
    assert_true(size[1] * 20 < size[0]);
}

/* One-record blocks of 3000 bytes stored raw: two per 8 KiB segment. */
static void test_rotation_release(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct journal_config c = config(dir);
    c.zstd_level = 0;
    c.segment_bytes = 8192;
    struct journal *j = jopen(&c);
    put_blocks(j, 10, 3000, NULL);
    assert_int_equal(count_files(dir, ".tjl"), 5);
    for (uint64_t l = 1; l <= 9; l += 2)
        assert_int_equal(file_size(dir, seg(l)), SEG_HDR + 2 * (BLK_HDR + REC_HDR + 3000));

    assert_int_equal(journal_release(j, 0), 0);
    assert_int_equal(journal_release(j, 1), 0); /* seg 1 still holds LSN 2 */
    assert_int_equal(journal_release(j, 2), 1);
    assert_false(exists(dir, seg(1)));
    assert_true(exists(dir, seg(3)));
    assert_int_equal(journal_release(j, 5), 1); /* seg 3 goes; seg 5 still holds 6 */
    assert_true(exists(dir, seg(5)));
    assert_int_equal(journal_release(j, 100), 2); /* seg 5 and 7; seg 9 is being written */
    assert_int_equal(count_files(dir, ".tjl"), 1);
    assert_true(exists(dir, seg(9)));
    assert_int_equal(journal_release(j, 100), 0);
    struct journal_usage u;
    journal_usage(j, &u);
    assert_int_equal(u.disk_bytes, (uint64_t)file_size(dir, seg(9)));
    journal_close(j);

    struct recs got = {0};
    struct journal_replay_stats st;
    replay(dir, &got, &st);
    assert_lsns(&got, 9, 2);
    j = jopen(&c);
    assert_int_equal(put(j, 1, "x", 1), 11);
    journal_close(j);
    recs_free(&got);
    rm_rf(dir);
}

static void test_torn_tail(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct journal_config c = config(dir);
    struct journal *j = jopen(&c);
    struct recs want = {0}, got = {0};
    for (int blk = 0; blk < 3; blk++) {
        for (int i = 0; i < (blk < 2 ? 5 : 3); i++) {
            char p[64];
            int n = snprintf(p, sizeof p, "block %d record %d", blk, i);
            recs_push(&want, 2, p, (size_t)n, put(j, 2, p, (size_t)n));
        }
        flush(j);
    }
    journal_close(j);
    size_t len, offs[8];
    uint8_t *orig = read_all(dir, seg(1), &len);
    assert_int_equal(block_offsets(orig, len, offs, 8), 3);
    size_t last = offs[2];

    for (size_t cut = last; cut < len; cut++) {
        struct journal_replay_stats st;
        write_all(dir, seg(1), orig, cut);
        replay(dir, &got, &st);
        assert_lsns(&got, 1, 10);
        assert_same(&want, 0, &got, 0, 10);
        assert_int_equal(st.torn_tail_bytes, cut - last);
        assert_int_equal(st.quarantined, 0);
        assert_int_equal(exists(dir, seg(1)), true);
        recs_free(&got);

        /* Reopening truncates the tail away; new records follow the old ones. */
        j = jopen(&c);
        assert_int_equal(file_size(dir, seg(1)), (long long)last);
        assert_int_equal(put(j, 3, "new one", 7), 11);
        assert_int_equal(put(j, 3, "new two", 7), 12);
        flush(j);
        journal_close(j);
        replay(dir, &got, &st);
        assert_lsns(&got, 1, 12);
        assert_same(&want, 0, &got, 0, 10);
        assert_memory_equal(got.v[11].data, "new two", 7);
        assert_int_equal(st.torn_tail_bytes, 0);
        assert_int_equal(count_files(dir, ".corrupt"), 0);
        recs_free(&got);
    }

    /* A tail of zeros (size extended, data never written) is torn too. */
    uint8_t *padded = calloc(1, len + 300);
    assert_non_null(padded);
    memcpy(padded, orig, len);
    write_all(dir, seg(1), padded, len + 300);
    struct journal_replay_stats st;
    replay(dir, &got, &st);
    assert_lsns(&got, 1, 13);
    assert_int_equal(st.torn_tail_bytes, 300);
    assert_int_equal(st.quarantined, 0);
    free(padded);
    free(orig);
    recs_free(&got);
    recs_free(&want);
    rm_rf(dir);
}

/* Three segments of three 1000-byte one-record blocks each, stored raw: LSNs 1..9. */
static void three_segments(const char *dir, struct recs *want)
{
    struct journal_config c = config(dir);
    c.zstd_level = 0;
    c.segment_bytes = SEG_HDR + 3 * (BLK_HDR + REC_HDR + 1000);
    struct journal *j = jopen(&c);
    put_blocks(j, 9, 1000, want);
    journal_close(j);
    assert_int_equal(count_files(dir, ".tjl"), 3);
}

static void test_corrupt_block(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct recs want = {0}, got = {0};
    struct journal_replay_stats st;
    three_segments(dir, &want);

    size_t len, offs[4];
    uint8_t *img = read_all(dir, seg(1), &len);
    assert_int_equal(block_offsets(img, len, offs, 4), 3);
    img[offs[1] + BLK_HDR + 100] ^= 0x40; /* inside LSN 2's payload */
    write_all(dir, seg(1), img, len);
    free(img);

    char *text = NULL;
    size_t tlen = 0;
    FILE *out = open_memstream(&text, &tlen);
    assert_int_equal(journal_verify(dir, out), 1);
    fclose(out);
    assert_non_null(strstr(text, "CORRUPT"));
    assert_non_null(strstr(text, "block CRC mismatch"));
    assert_non_null(strstr(text, "segments: 3"));
    free(text);
    assert_int_equal(count_files(dir, ".corrupt"), 0); /* verify moves nothing */

    replay(dir, &got, &st);
    assert_int_equal(st.quarantined, 1);
    assert_int_equal(st.segments, 3);
    assert_int_equal(got.n, 7); /* LSN 1, before the bad block, then 4..9 */
    assert_same(&want, 0, &got, 0, 1);
    assert_same(&want, 3, &got, 1, 6);
    assert_false(exists(dir, seg(1)));
    char moved[128];
    snprintf(moved, sizeof moved, "%s.corrupt", seg(1));
    assert_true(exists(dir, moved));
    assert_int_equal(file_size(dir, moved), (long long)len);
    assert_non_null(strstr(st.last_problem, "CRC"));

    /* The next replay no longer sees it; new LSNs follow the highest ever used. */
    recs_free(&got);
    replay(dir, &got, &st);
    assert_lsns(&got, 4, 6);
    assert_int_equal(st.quarantined, 0);
    struct journal_config c = config(dir);
    struct journal *j = jopen(&c);
    assert_int_equal(put(j, 1, "", 0), 10);
    journal_close(j);

    recs_free(&want);
    recs_free(&got);
    rm_rf(dir);
}

/* A last segment whose block is complete but damaged is quarantined, not truncated. */
static void test_corrupt_last_block(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct recs want = {0}, got = {0};
    struct journal_replay_stats st;
    three_segments(dir, &want);
    size_t len, offs[4];
    uint8_t *img = read_all(dir, seg(7), &len);
    assert_int_equal(block_offsets(img, len, offs, 4), 3);
    img[offs[2] + 20] ^= 1; /* LSN field of the last block */
    write_all(dir, seg(7), img, len);
    free(img);

    /* journal_open on its own (no replay) moves it aside too, and LSNs stay unique. */
    struct journal_config c = config(dir);
    struct journal *j = jopen(&c);
    assert_int_equal(count_files(dir, ".corrupt"), 1);
    assert_int_equal(put(j, 1, "z", 1), 9); /* 7 and 8 are intact in the quarantined file */
    flush(j);
    journal_close(j);
    replay(dir, &got, &st);
    assert_int_equal(got.n, 7);
    assert_same(&want, 0, &got, 0, 6);
    assert_int_equal(got.v[6].lsn, 9);
    recs_free(&got);
    recs_free(&want);
    rm_rf(dir);
}

static void test_garbage_segments(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct recs want = {0}, got = {0};
    struct journal_replay_stats st;
    three_segments(dir, &want);

    /* Bad magic in segment 4's header. */
    size_t len;
    uint8_t *img = read_all(dir, seg(4), &len);
    img[0] = 'X';
    write_all(dir, seg(4), img, len);
    free(img);
    /* A zero-length segment, and random bytes named like segments, one of them last. */
    write_all(dir, seg(2), "", 0);
    uint8_t *junk = random_bytes(5000);
    write_all(dir, seg(5), junk, 5000);
    write_all(dir, seg(0x100), junk, 30);
    free(junk);
    /* Names that are not segments are left alone. */
    write_all(dir, "seg-XYZ.tjl", "a", 1);
    write_all(dir, "seg-0000000000000001.tjl.bak", "a", 1);

    replay(dir, &got, &st);
    assert_int_equal(st.quarantined, 4);
    assert_int_equal(st.segments, 6);
    assert_int_equal(got.n, 6);
    assert_same(&want, 0, &got, 0, 3);
    assert_same(&want, 6, &got, 3, 3);
    assert_int_equal(count_files(dir, ".corrupt"), 4);
    assert_int_equal(count_files(dir, ".tjl"), 3); /* seg 1, 7 and seg-XYZ.tjl */
    assert_true(exists(dir, "seg-XYZ.tjl"));
    assert_true(exists(dir, "seg-0000000000000001.tjl.bak"));

    struct journal_config c = config(dir);
    struct journal *j = jopen(&c);
    assert_int_equal(put(j, 1, "a", 1), 0x101);
    flush(j);
    journal_close(j);
    recs_free(&got);
    replay(dir, &got, &st);
    assert_int_equal(got.n, 7);
    assert_int_equal(got.v[6].lsn, 0x101);
    assert_int_equal(st.quarantined, 0);

    /* Quarantining the same name twice keeps both files. */
    write_all(dir, seg(0x100), "again", 5);
    recs_free(&got);
    replay(dir, &got, &st);
    assert_int_equal(st.quarantined, 1);
    assert_true(exists(dir, "seg-0000000000000100.tjl.corrupt.1"));

    recs_free(&want);
    recs_free(&got);
    rm_rf(dir);
}

/* Random damage: replay delivers an intact prefix, never crashes; open then works. */
static void test_random_damage(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct recs want = {0}, got = {0};
    struct journal_config c = config(dir);
    struct journal *j = jopen(&c);
    for (int b = 0; b < 8; b++) {
        for (int i = 0; i < 4; i++) {
            size_t n = rng() % 300;
            uint8_t *p = random_bytes(n);
            if (i & 1)
                memset(p, 'a', n);
            recs_push(&want, 5, p, n, put(j, 5, p, n));
            free(p);
        }
        flush(j);
    }
    journal_close(j);
    size_t len;
    uint8_t *orig = read_all(dir, seg(1), &len);

    for (int iter = 0; iter < 400; iter++) {
        uint8_t *img = malloc(len);
        assert_non_null(img);
        memcpy(img, orig, len);
        size_t n = len;
        int hits = 1 + (int)(rng() % 4);
        for (int k = 0; k < hits; k++)
            img[rng() % len] = (uint8_t)rng();
        if (iter % 3 == 0)
            n = (size_t)(rng() % len);
        write_all(dir, seg(1), img, n);
        free(img);

        struct journal_replay_stats st;
        struct journal_error err;
        assert_int_equal(journal_replay(dir, collect, &got, &st, &err), 0);
        assert_true(got.n <= want.n);
        assert_same(&want, 0, &got, 0, got.n);
        size_t kept = st.quarantined ? 0 : got.n;
        FILE *devnull = fopen("/dev/null", "w");
        assert_true(journal_verify(dir, devnull) >= 0);
        assert_int_equal(journal_status(dir, devnull), 0);
        fclose(devnull);
        j = jopen(&c);
        uint64_t lsn = put(j, 1, "x", 1);
        assert_true(lsn > got.n);
        flush(j);
        journal_close(j);
        recs_free(&got);
        /* Opening dropped nothing intact that replay had delivered and kept. */
        assert_int_equal(journal_replay(dir, collect, &got, &st, &err), 0);
        assert_int_equal(got.n, kept + 1);
        assert_same(&want, 0, &got, 0, kept);
        assert_int_equal(got.v[kept].lsn, lsn);
        assert_int_equal(st.quarantined + st.torn_tail_bytes, 0);
        recs_free(&got);
        rm_rf(dir);
        assert_int_equal(mkdir(dir, 0700), 0);
    }
    free(orig);
    recs_free(&want);
    rm_rf(dir);
}

static void test_quota(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct journal_config c = config(dir);
    c.zstd_level = 0;
    c.segment_bytes = 4096;
    c.quota_bytes = 16384;
    struct journal *j = jopen(&c);
    uint8_t p[1000] = {0};
    uint64_t lsn = 0, dummy;
    int written = 0;
    for (;;) {
        int rc = journal_append(j, 1, p, sizeof p, &lsn);
        if (rc == -ENOSPC)
            break;
        assert_int_equal(rc, 0);
        flush(j);
        written++;
    }
    assert_true(written >= 10 && written <= 16);
    /* Records appended but not written count too. */
    assert_int_equal(journal_release(j, 0), 0);
    assert_int_equal(journal_append(j, 1, p, sizeof p, &dummy), -ENOSPC);

    assert_true(journal_release(j, lsn) > 0);
    assert_int_equal(count_files(dir, ".tjl"), 1);
    for (int i = 0; i < 5; i++)
        assert_int_equal(journal_append(j, 1, p, sizeof p, &dummy), 0);
    struct journal_usage u;
    journal_usage(j, &u);
    assert_int_equal(u.pending_bytes, 5 * (REC_HDR + sizeof p));
    /* A sealed block dropped unwritten gives its bytes back. */
    journal_block_free(journal_seal(j));
    journal_usage(j, &u);
    assert_int_equal(u.pending_bytes, 0);
    journal_close(j);
    rm_rf(dir);
}

static void test_fsync_policies(void **state)
{
    (void)state;
    static const struct {
        int policy;
        uint32_t interval;
    } cases[] = {{JOURNAL_FSYNC_ALWAYS, 0},
                 {JOURNAL_FSYNC_INTERVAL, 0},
                 {JOURNAL_FSYNC_INTERVAL, 60000},
                 {JOURNAL_FSYNC_NEVER, 0}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char dir[64];
        make_dir(dir);
        struct journal_config c = config(dir);
        c.fsync = cases[k].policy;
        c.fsync_interval_ms = cases[k].interval;
        c.segment_bytes = 2048;
        struct journal *j = jopen(&c);
        struct recs want = {0}, got = {0};
        struct journal_error err;
        put_blocks(j, 6, 900, &want);
        assert_int_equal(journal_sync(j, &err), 0);
        journal_close(j);
        struct journal_replay_stats st;
        replay(dir, &got, &st);
        assert_lsns(&got, 1, 6);
        assert_same(&want, 0, &got, 0, 6);
        assert_true(st.segments >= 2);
        recs_free(&want);
        recs_free(&got);
        rm_rf(dir);
    }
}

static char *capture(int (*fn)(const char *, FILE *), const char *dir, int *rc)
{
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    assert_non_null(out);
    *rc = fn(dir, out);
    assert_int_equal(fclose(out), 0);
    return text;
}

static void test_verify_status(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct recs want = {0};
    int rc;
    three_segments(dir, &want);

    char *text = capture(journal_verify, dir, &rc);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(text, "segments: 3, "));
    assert_non_null(strstr(text, "records: 9"));
    assert_non_null(strstr(text, "seg-0000000000000004.tjl: 3195 bytes, 3 blocks, 3 records"));
    assert_non_null(strstr(text, "intact"));
    free(text);
    text = capture(journal_status, dir, &rc);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(text, "segments: 3, "));
    assert_non_null(strstr(text, "records: 9"));
    assert_non_null(strstr(text, "LSN 1..9"));
    assert_non_null(strstr(text, "oldest record: "));
    free(text);

    /* A torn tail is reported; the files stay as they are. */
    size_t len;
    uint8_t *img = read_all(dir, seg(7), &len);
    write_all(dir, seg(7), img, len - 10);
    free(img);
    text = capture(journal_verify, dir, &rc);
    assert_int_equal(rc, 1);
    assert_non_null(strstr(text, "torn tail at offset"));
    assert_non_null(strstr(text, "records: 8"));
    free(text);
    assert_int_equal(file_size(dir, seg(7)), (long long)len - 10);

    /* Missing directory. */
    rm_rf(dir);
    text = capture(journal_verify, dir, &rc);
    assert_int_equal(rc, -ENOENT);
    free(text);
    struct journal_replay_stats st;
    struct recs got = {0};
    replay(dir, &got, &st);
    assert_int_equal(got.n, 0);
    recs_free(&want);
}

/* A write that fails (file size limit) leaves no partial block, and the block can be retried. */
static void test_write_failure_resume(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    struct journal_config c = config(dir);
    c.zstd_level = 0;
    struct journal *j = jopen(&c);
    struct recs want = {0}, got = {0};
    struct journal_error err;
    struct rlimit saved, lim;
    put_blocks(j, 2, 10, &want);
    long long before = file_size(dir, seg(1));
    for (int i = 0; i < 3; i++) { /* three disk blocks of one 600 KiB record each */
        uint8_t *p = random_bytes(600 << 10);
        recs_push(&want, 4, p, 600 << 10, put(j, 4, p, 600 << 10));
        free(p);
    }
    struct journal_block *b = journal_seal(j);

    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    signal(SIGXFSZ, SIG_IGN);
    lim = saved;
    lim.rlim_cur = (rlim_t)before + 100;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    assert_int_equal(journal_write_block(j, b, &err), -EFBIG);
    assert_int_equal(file_size(dir, seg(1)), before); /* the partial block is gone */
    lim.rlim_cur = (rlim_t)before + 900000; /* the first disk block fits, the second not */
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    assert_int_equal(journal_write_block(j, b, &err), -EFBIG);
    assert_non_null(strstr(err.message, "write to seg-"));
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
    assert_int_equal(journal_write_block(j, b, &err), 0);
    journal_block_free(b);
    journal_close(j);

    struct journal_replay_stats st;
    replay(dir, &got, &st);
    assert_lsns(&got, 1, 5);
    assert_same(&want, 0, &got, 0, 5);
    assert_int_equal(st.torn_tail_bytes + st.quarantined, 0);
    recs_free(&want);
    recs_free(&got);
    rm_rf(dir);
}

static void test_api_edges(void **state)
{
    (void)state;
    char dir[64], nested[128];
    make_dir(dir);
    snprintf(nested, sizeof nested, "%s/a/b/journal", dir);
    struct journal_config c = config(nested);
    struct journal_error err;
    struct journal *j = NULL;

    c.zstd_level = 99;
    assert_int_equal(journal_open(&j, &c, &err), -EINVAL);
    assert_null(j);
    c.zstd_level = 1;
    c.fsync = 7;
    assert_int_equal(journal_open(&j, &c, &err), -EINVAL);
    c.fsync = JOURNAL_FSYNC_ALWAYS;
    j = jopen(&c); /* creates the missing directories */
    struct stat sb;
    assert_int_equal(stat(nested, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0700);

    /* Blocks must be written in LSN order. */
    put(j, 1, "one", 3);
    struct journal_block *b1 = journal_seal(j);
    put(j, 1, "two", 3);
    struct journal_block *b2 = journal_seal(j);
    assert_int_equal(journal_write_block(j, b2, &err), 0);
    assert_int_equal(journal_write_block(j, b1, &err), -EINVAL);
    assert_non_null(strstr(err.message, "not after"));
    journal_block_free(b1);
    journal_block_free(b2);
    put(j, 1, "dropped at close", 16);
    journal_close(j);

    /* A leftover .tmp segment is removed at open; the callback can stop the replay. */
    write_all(nested, "seg-00000000000000aa.tjl.tmp", "x", 1);
    j = jopen(&c);
    assert_false(exists(nested, "seg-00000000000000aa.tjl.tmp"));
    assert_int_equal(put(j, 1, "three", 5), 3);
    assert_int_equal(put(j, 1, "four", 4), 4);
    flush(j);
    journal_close(j);
    struct recs got = {.stop_at = 2};
    assert_int_equal(journal_replay(nested, collect, &got, NULL, &err), 7);
    assert_int_equal(got.n, 2);
    recs_free(&got);
    rm_rf(dir);
}

/* agent/journaldir.c: one user per directory, and an identity that lives as long as its LSNs. */
static void test_directory_lock_and_identity(void **state)
{
    (void)state;
    char dir[64], msg[512], id[JOURNALDIR_ID_LEN + 1], again[JOURNALDIR_ID_LEN + 1];
    make_dir(dir);
    int fd = journaldir_lock(dir, msg, sizeof msg);
    assert_true(fd >= 0);
    /* flock is per open file: a second lock, even from this process, is refused. */
    assert_int_equal(journaldir_lock(dir, msg, sizeof msg), -EWOULDBLOCK);
    char want[128];
    snprintf(want, sizeof want, "is in use by another trackd agent (pid %ld)", (long)getpid());
    assert_non_null(strstr(msg, want));
    close(fd);
    fd = journaldir_lock(dir, msg, sizeof msg);
    assert_true(fd >= 0);
    close(fd);

    assert_int_equal(journaldir_identity(dir, id, msg, sizeof msg), 0);
    assert_int_equal(strlen(id), JOURNALDIR_ID_LEN);
    assert_int_equal(strspn(id, "0123456789abcdef"), JOURNALDIR_ID_LEN);
    /* No segments yet: LSNs start at 1 again, so does the identity. */
    assert_int_equal(journaldir_identity(dir, again, msg, sizeof msg), 0);
    assert_string_not_equal(id, again);
    /* With a segment the identity stays. */
    char seg[128];
    snprintf(seg, sizeof seg, "%s/seg-0000000000000001.tjl", dir);
    FILE *f = fopen(seg, "w");
    assert_non_null(f);
    fclose(f);
    assert_int_equal(journaldir_identity(dir, id, msg, sizeof msg), 0);
    assert_string_equal(id, again);
    /* A damaged identity is an error, never silently replaced. */
    char idpath[128];
    snprintf(idpath, sizeof idpath, "%s/journal.id", dir);
    f = fopen(idpath, "w");
    fputs("not-an-id\n", f);
    fclose(f);
    assert_int_equal(journaldir_identity(dir, id, msg, sizeof msg), -EINVAL);
    assert_non_null(strstr(msg, "is not a journal identity"));
    rm_rf(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_directory_lock_and_identity),
        cmocka_unit_test(test_crc32c),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_compression),
        cmocka_unit_test(test_rotation_release),
        cmocka_unit_test(test_torn_tail),
        cmocka_unit_test(test_corrupt_block),
        cmocka_unit_test(test_corrupt_last_block),
        cmocka_unit_test(test_garbage_segments),
        cmocka_unit_test(test_random_damage),
        cmocka_unit_test(test_quota),
        cmocka_unit_test(test_fsync_policies),
        cmocka_unit_test(test_verify_status),
        cmocka_unit_test(test_write_failure_resume),
        cmocka_unit_test(test_api_edges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
