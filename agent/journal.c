/*
 * The on-disk journal (format: agent/JOURNAL.md). Appending and sealing only copy bytes on the
 * loop thread; journal_write_block does the blocking part (zstd, pwrite, fsync) on one worker
 * thread at a time. Everything read from disk is checked against the file's size and fixed caps
 * before it is trusted, so a corrupt or hostile segment costs a quarantine, never a crash.
 */
#include "journal.h"

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#include "util.h"

#if defined(__GNUC__)
#define PRINTF_LIKE(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define PRINTF_LIKE(fmt, args)
#endif

#define SEG_MAGIC "TRKDJRNL"
#define SEG_VERSION 1
#define SEG_HDR 36
#define BLK_MAGIC "TJBK"
#define BLK_HDR 48
#define BLK_COMPRESSED 1u
#define REC_HDR 5
#define BLK_RAW_TARGET (1u << 20) /* sealed blocks are cut into disk blocks of about this */
#define BLK_RAW_MAX (JOURNAL_RECORD_MAX + REC_HDR)
#define LSN_MAX (UINT64_C(1) << 62) /* file names at or above are not segments */
#define NAME_CAP 48
#define PATH_CAP 4096

/* ---- helpers ---------------------------------------------------------------- */

static uint64_t max64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

PRINTF_LIKE(3, 4)
static int fail(struct journal_error *err, int rc, const char *fmt, ...)
{
    if (err != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return rc;
}

/* Grows *buf to hold need bytes, at least doubling so that appends stay amortised. */
static int grow(uint8_t **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap * 2 > need ? *cap * 2 : need < 4096 ? 4096 : need;
    uint8_t *p = realloc(*buf, c);
    if (p == NULL)
        return -ENOMEM;
    *buf = p, *cap = c;
    return 0;
}

/* pread or pwrite of exactly n bytes; a short read means the file shrank under us. */
static int io_full(int fd, void *buf, size_t n, uint64_t off, bool writing)
{
    for (uint8_t *p = buf; n > 0;) {
        ssize_t r = writing ? pwrite(fd, p, n, (off_t)off) : pread(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EIO;
        p += r, n -= (size_t)r, off += (uint64_t)r;
    }
    return 0;
}

/* ---- CRC32C ----------------------------------------------------------------- */

/* Slicing-by-8 over the reflected Castagnoli polynomial; the tables are built once. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

uint32_t journal_crc32c(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    pthread_once(&crc_once, crc_init);
    crc = ~crc;
    for (; len >= 8; p += 8, len -= 8) {
        uint32_t lo = crc ^ util_get_le32(p), hi = util_get_le32(p + 4);
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
              crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^
              crc_table[2][(hi >> 8) & 0xff] ^ crc_table[1][(hi >> 16) & 0xff] ^
              crc_table[0][hi >> 24];
    }
    while (len--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

/* ---- directory -------------------------------------------------------------- */

enum ent_kind { ENT_LIVE, ENT_CORRUPT, ENT_TMP };

struct ent {
    uint64_t lsn;
    int kind;
    char name[NAME_CAP];
};

static void seg_name(char *name, uint64_t lsn)
{
    snprintf(name, NAME_CAP, "seg-%016" PRIx64 ".tjl", lsn);
}

/* Recognises seg-<16 lower-case hex>.tjl and its .tjl.corrupt[.N] and .tjl.tmp forms. */
static bool parse_name(const char *name, struct ent *e)
{
    uint64_t v = 0;
    if (strncmp(name, "seg-", 4) != 0 || strlen(name) >= NAME_CAP)
        return false;
    for (int i = 4; i < 20; i++) {
        char c = name[i];
        if ((c < '0' || c > '9') && (c < 'a' || c > 'f'))
            return false;
        v = v << 4 | (uint64_t)(c <= '9' ? c - '0' : c - 'a' + 10);
    }
    if (strcmp(name + 20, ".tjl") == 0)
        e->kind = ENT_LIVE;
    else if (strncmp(name + 20, ".tjl.corrupt", 12) == 0)
        e->kind = ENT_CORRUPT;
    else if (strcmp(name + 20, ".tjl.tmp") == 0)
        e->kind = ENT_TMP;
    else
        return false;
    e->lsn = v;
    strcpy(e->name, name);
    return v != 0 && v < LSN_MAX;
}

static int ent_cmp(const void *a, const void *b)
{
    const struct ent *x = a, *y = b;
    if (x->lsn != y->lsn)
        return x->lsn < y->lsn ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Lists the journal's files sorted by LSN; *out is owned by the caller. */
static int list_dir(int dfd, struct ent **out, size_t *n)
{
    struct ent *v = NULL;
    size_t cap = 0;
    int rc = 0, fd = openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    *out = NULL, *n = 0;
    if (d == NULL) {
        rc = -errno;
        if (fd >= 0)
            close(fd);
        return rc;
    }
    for (struct dirent *de; rc == 0 && (de = readdir(d)) != NULL;) {
        struct ent e;
        if (!parse_name(de->d_name, &e))
            continue;
        if (*n == cap) {
            struct ent *nv = realloc(v, (cap = cap ? cap * 2 : 16) * sizeof *nv);
            if (nv == NULL) {
                rc = -ENOMEM;
                break;
            }
            v = nv;
        }
        v[(*n)++] = e;
    }
    closedir(d);
    if (rc != 0 || *n == 0) {
        free(v);
        *n = 0;
        return rc;
    }
    qsort(v, *n, sizeof *v, ent_cmp);
    *out = v;
    return 0;
}

/* rename() that never replaces: a quarantined file must not be overwritten. */
static int move_noreplace(int dfd, const char *from, const char *to)
{
    if (linkat(dfd, from, dfd, to, 0) == 0)
        return unlinkat(dfd, from, 0) == 0 ? 0 : -errno;
    if (errno == EEXIST || faccessat(dfd, to, F_OK, 0) == 0)
        return -EEXIST;
    return renameat(dfd, from, dfd, to) == 0 ? 0 : -errno; /* no hard links on this fs */
}

/* Moves name aside to name.corrupt (or .corrupt.N if taken); the new name goes to moved. */
static int quarantine(int dfd, const char *name, char *moved, size_t cap)
{
    int rc = -EEXIST;
    for (int i = 0; i < 100 && rc == -EEXIST; i++) {
        if (i == 0)
            snprintf(moved, cap, "%s.corrupt", name);
        else
            snprintf(moved, cap, "%s.corrupt.%d", name, i);
        rc = move_noreplace(dfd, name, moved);
    }
    if (rc == 0)
        fsync(dfd);
    return rc;
}

/* ---- reading segments ------------------------------------------------------- */

enum seg_status { SEG_OK, SEG_TORN, SEG_CORRUPT, SEG_BAD_HEADER };
enum scan_mode { SCAN_HEADERS, SCAN_CRC, SCAN_FULL };

struct blk {
    uint32_t flags, stored, raw, count;
    uint64_t first_lsn, wall_ms;
};

/* State and results of reading segments one after the other, buffers reused. */
struct scan {
    enum scan_mode mode;
    journal_record_cb cb; /* SCAN_FULL; NULL only checks */
    void *ctx;
    uint8_t *stored, *raw;
    size_t stored_cap, raw_cap;
    ZSTD_DCtx *dctx;
    uint64_t prev_lsn; /* the last LSN accepted, across segments */
    /* Results of the last scan_segment: */
    enum seg_status status;
    uint64_t size, end; /* end: offset after the last intact block */
    uint64_t blocks, records, bytes, first_lsn, last_lsn, oldest_ms;
    int cb_rc;
    char why[160];
};

static void scan_free(struct scan *s)
{
    free(s->stored);
    free(s->raw);
    ZSTD_freeDCtx(s->dctx);
}

static const char *seg_header_check(const uint8_t *h, uint64_t name_lsn)
{
    if (memcmp(h, SEG_MAGIC, 8) != 0)
        return "bad segment magic";
    if (journal_crc32c(0, h, 32) != util_get_le32(h + 32))
        return "segment header CRC mismatch";
    if (util_get_le32(h + 8) != SEG_VERSION || util_get_le32(h + 12) != 0)
        return "unsupported segment version";
    if (util_get_le64(h + 16) != name_lsn)
        return "segment header LSN differs from the file name";
    return NULL;
}

/* Decodes a block header and checks its own CRC and every field against its caps. */
static const char *blk_header_check(const uint8_t *h, struct blk *b)
{
    b->flags = util_get_le32(h + 4);
    b->stored = util_get_le32(h + 8);
    b->raw = util_get_le32(h + 12);
    b->first_lsn = util_get_le64(h + 16);
    b->count = util_get_le32(h + 24);
    b->wall_ms = util_get_le64(h + 32);
    if (memcmp(h, BLK_MAGIC, 4) != 0)
        return "bad block magic";
    if (journal_crc32c(0, h, 44) != util_get_le32(h + 44))
        return "block header CRC mismatch";
    if ((b->flags & ~BLK_COMPRESSED) != 0 || util_get_le32(h + 28) != 0)
        return "unknown block flags";
    if (b->raw > BLK_RAW_MAX || b->count == 0 || b->count > b->raw / REC_HDR)
        return "bad block raw length or record count";
    if ((b->flags & BLK_COMPRESSED) ? b->stored == 0 || b->stored > ZSTD_compressBound(b->raw)
                                    : b->stored != b->raw)
        return "bad block stored length";
    return b->first_lsn == 0 || b->first_lsn >= LSN_MAX ? "bad block LSN" : NULL;
}

/* True if raw holds exactly count records with types 1..255. */
static bool records_ok(const uint8_t *raw, size_t len, uint32_t count)
{
    size_t off = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (len - off < REC_HDR || raw[off] == 0 ||
            util_get_le32(raw + off + 1) > len - off - REC_HDR)
            return false;
        off += REC_HDR + util_get_le32(raw + off + 1);
    }
    return off == len;
}

/*
 * Records why a segment stops being readable at off. The rest of the file is a torn tail when it
 * is shorter than a block header, or than the block an intact header announces, or when it is
 * all zeros (size extended, data never written); anything else is corruption.
 */
static int scan_stop(struct scan *s, int fd, enum seg_status st, uint64_t off, const char *why)
{
    uint8_t buf[4096];
    bool zero = st == SEG_CORRUPT;
    for (uint64_t at = off; zero && at < s->size;) {
        size_t n = s->size - at < sizeof buf ? (size_t)(s->size - at) : sizeof buf;
        int rc = io_full(fd, buf, n, at, false);
        if (rc != 0)
            return rc;
        for (size_t i = 0; i < n && zero; i++)
            zero = buf[i] == 0;
        at += n;
    }
    s->status = zero ? SEG_TORN : st;
    snprintf(s->why, sizeof s->why, "offset %" PRIu64 ": %s", off, why);
    return 0;
}

/* Reads block b's stored bytes at off and checks them; NULL if intact, else why not. */
static const char *scan_block(struct scan *s, int fd, const uint8_t *h, const struct blk *b,
                              uint64_t off, const uint8_t **raw, int *rc)
{
    if ((*rc = grow(&s->stored, &s->stored_cap, b->stored)) != 0 ||
        (*rc = io_full(fd, s->stored, b->stored, off + BLK_HDR, false)) != 0)
        return "read failed";
    if (journal_crc32c(journal_crc32c(0, h, 40), s->stored, b->stored) != util_get_le32(h + 40))
        return "block CRC mismatch";
    if (s->mode != SCAN_FULL)
        return NULL;
    *raw = s->stored;
    if (b->flags & BLK_COMPRESSED) {
        if (s->dctx == NULL && (s->dctx = ZSTD_createDCtx()) == NULL)
            *rc = -ENOMEM;
        if (*rc != 0 || (*rc = grow(&s->raw, &s->raw_cap, b->raw)) != 0)
            return "out of memory";
        size_t r = ZSTD_decompressDCtx(s->dctx, s->raw, b->raw, s->stored, b->stored);
        if (ZSTD_isError(r) || r != b->raw)
            return "zstd data does not decode to the stated length";
        *raw = s->raw;
    }
    return records_ok(*raw, b->raw, b->count) ? NULL : "malformed records";
}

/*
 * Reads one segment as far as it is intact, delivering records to s->cb in SCAN_FULL. Returns 0
 * with the verdict in s->status (s->cb_rc set if cb stopped it), or -errno on an I/O error.
 */
static int scan_segment(struct scan *s, int fd, uint64_t name_lsn)
{
    uint8_t h[BLK_HDR];
    struct stat sb;
    int rc = 0;

    s->status = SEG_OK;
    s->end = s->blocks = s->records = s->bytes = s->first_lsn = s->last_lsn = s->oldest_ms = 0;
    s->cb_rc = 0;
    if (fstat(fd, &sb) != 0)
        return -errno;
    s->size = (uint64_t)sb.st_size;
    if (s->size < SEG_HDR)
        return scan_stop(s, fd, SEG_BAD_HEADER, 0, "shorter than a segment header");
    if ((rc = io_full(fd, h, SEG_HDR, 0, false)) != 0)
        return rc;
    const char *why = seg_header_check(h, name_lsn);
    if (why == NULL && name_lsn <= s->prev_lsn)
        why = "segment LSN not after the previous segment's records";
    if (why != NULL)
        return scan_stop(s, fd, SEG_BAD_HEADER, 0, why);

    uint64_t off = s->end = SEG_HDR, min_lsn = name_lsn;
    while (off < s->size) {
        const uint8_t *raw = NULL;
        struct blk b;
        if (s->size - off < BLK_HDR)
            return scan_stop(s, fd, SEG_TORN, off, "partial block header");
        if ((rc = io_full(fd, h, BLK_HDR, off, false)) != 0)
            return rc;
        if ((why = blk_header_check(h, &b)) != NULL)
            return scan_stop(s, fd, SEG_CORRUPT, off, why);
        if (BLK_HDR + (uint64_t)b.stored > s->size - off)
            return scan_stop(s, fd, SEG_TORN, off, "block extends past the end of the file");
        if (b.first_lsn < min_lsn)
            return scan_stop(s, fd, SEG_CORRUPT, off, "block LSN out of order");
        if (s->mode != SCAN_HEADERS && (why = scan_block(s, fd, h, &b, off, &raw, &rc)) != NULL)
            return rc != 0 ? rc : scan_stop(s, fd, SEG_CORRUPT, off, why);

        uint64_t lsn = b.first_lsn;
        for (size_t p = 0; s->cb != NULL && raw != NULL && p < b.raw; lsn++) {
            uint32_t n = util_get_le32(raw + p + 1);
            if ((s->cb_rc = s->cb(s->ctx, raw[p], raw + p + REC_HDR, n, lsn)) != 0)
                return 0;
            p += REC_HDR + n;
        }
        s->first_lsn = s->first_lsn ? s->first_lsn : b.first_lsn;
        s->last_lsn = s->prev_lsn = b.first_lsn + b.count - 1;
        min_lsn = s->last_lsn + 1;
        if (s->oldest_ms == 0 || b.wall_ms < s->oldest_ms)
            s->oldest_ms = b.wall_ms;
        s->blocks++;
        s->records += b.count;
        s->bytes += b.raw - (uint64_t)b.count * REC_HDR;
        off = s->end = off + BLK_HDR + b.stored;
    }
    return 0;
}

/* Opens and scans one segment file; flags are open()'s. On success *fd stays open if wanted. */
static int scan_file(struct scan *s, int dfd, const struct ent *e, int flags, int *fd)
{
    int f = openat(dfd, e->name, flags | O_CLOEXEC), rc = f < 0 ? -errno : 0;
    if (rc == 0 && (rc = scan_segment(s, f, e->lsn)) == 0 && fd != NULL)
        *fd = f;
    else if (f >= 0)
        close(f);
    return rc;
}

/* ---- the journal ------------------------------------------------------------- */

struct segment {
    uint64_t first_lsn;
    uint64_t size;
};

struct journal {
    struct journal_config cfg; /* cfg.dir is not kept */
    int dfd;
    uint64_t next_lsn;          /* loop thread */
    struct journal_block *open; /* loop thread */
    _Atomic uint64_t disk_bytes;
    _Atomic uint64_t pending_bytes;
    /* The writer's side: journal_write_block, or release and sync when no write runs. */
    struct segment *segs; /* live segments in LSN order; the last one is written */
    size_t nsegs, capsegs;
    int fd;         /* the last segment, or -1 until the next write starts one */
    bool dirty;     /* written since the last fsync */
    bool broken;    /* a failed write could not be truncated away: rotate before writing */
    int sync_error; /* a failed fsync: every later write fails */
    uint64_t last_sync_ms;
    uint64_t last_written_lsn;
    ZSTD_CCtx *cctx;
    uint8_t *zbuf; /* block header + compressed bytes */
    size_t zcap;
};

struct journal_block {
    struct journal *j;
    uint8_t *raw; /* records, encoded as on disk */
    size_t len, cap;
    uint64_t first_lsn, count, wall_ms;
    size_t done;       /* raw bytes written: a failed write resumes here */
    uint64_t done_lsn; /* LSN of the first record not yet written */
    bool pending;      /* len is still counted in j->pending_bytes */
};

static int push_segment(struct journal *j, uint64_t lsn, uint64_t size)
{
    struct segment *v = util_grow(j->segs, &j->capsegs, j->nsegs, sizeof *v, 16);
    if (v == NULL)
        return -ENOMEM;
    j->segs = v;
    j->segs[j->nsegs++] = (struct segment){lsn, size};
    atomic_fetch_add(&j->disk_bytes, size);
    return 0;
}

/*
 * Makes the last live segment writable again: a torn tail is truncated away (under ALWAYS it was
 * never acknowledged); a corrupt segment is moved aside and the next write starts a new one.
 */
static int open_last(struct journal *j, uint64_t *high, struct journal_error *err)
{
    struct segment *seg = &j->segs[j->nsegs - 1];
    struct scan s = {.mode = SCAN_CRC};
    struct ent e = {.lsn = seg->first_lsn};
    char moved[NAME_CAP + 24];
    int fd = -1, rc;

    seg_name(e.name, e.lsn);
    rc = scan_file(&s, j->dfd, &e, O_RDWR, &fd);
    scan_free(&s);
    if (rc != 0)
        return fail(err, rc, "cannot read %s: %s", e.name, strerror(-rc));
    *high = max64(*high, max64(s.last_lsn, e.lsn - 1));
    if (s.status == SEG_OK || s.status == SEG_TORN) {
        if (s.end < s.size && (ftruncate(fd, (off_t)s.end) != 0 ||
                               (j->cfg.fsync != JOURNAL_FSYNC_NEVER && fdatasync(fd) != 0))) {
            rc = -errno;
            close(fd);
            return fail(err, rc, "cannot truncate the torn tail of %s: %s", e.name, strerror(-rc));
        }
        atomic_fetch_sub(&j->disk_bytes, s.size - s.end);
        seg->size = s.end;
        j->fd = fd;
        return 0;
    }
    close(fd);
    if ((rc = quarantine(j->dfd, e.name, moved, sizeof moved)) != 0)
        return fail(err, rc, "cannot move corrupt %s aside: %s", e.name, strerror(-rc));
    atomic_fetch_sub(&j->disk_bytes, seg->size);
    j->nsegs--;
    *high = max64(*high, e.lsn);
    return 0;
}

int journal_open(struct journal **out, const struct journal_config *cfg, struct journal_error *err)
{
    struct journal *j = NULL;
    struct ent *ents = NULL;
    size_t n = 0;
    uint64_t high = 0;
    int rc;

    *out = NULL;
    if (cfg->dir == NULL || cfg->dir[0] == '\0')
        return fail(err, -EINVAL, "journal directory is empty");
    if (cfg->fsync < JOURNAL_FSYNC_ALWAYS || cfg->fsync > JOURNAL_FSYNC_NEVER)
        return fail(err, -EINVAL, "unknown fsync policy %d", cfg->fsync);
    if (cfg->zstd_level < 0 || cfg->zstd_level > ZSTD_maxCLevel())
        return fail(err, -EINVAL, "zstd level %d is outside 0..%d", cfg->zstd_level,
                    ZSTD_maxCLevel());
    if ((rc = util_mkdir_p(cfg->dir, 0700, 0700)) != 0)
        return fail(err, rc, "cannot create %s: %s", cfg->dir, strerror(-rc));
    if ((j = calloc(1, sizeof *j)) == NULL)
        return fail(err, -ENOMEM, "out of memory");
    j->cfg = *cfg;
    j->cfg.dir = NULL;
    j->cfg.segment_bytes = cfg->segment_bytes ? cfg->segment_bytes : JOURNAL_SEGMENT_DEFAULT;
    j->fd = -1;
    if ((j->dfd = open(cfg->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        rc = fail(err, -errno, "cannot open %s: %s", cfg->dir, strerror(errno));
        goto out;
    }
    if (cfg->zstd_level > 0 && (j->cctx = ZSTD_createCCtx()) == NULL) {
        rc = fail(err, -ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = list_dir(j->dfd, &ents, &n)) != 0) {
        rc = fail(err, rc, "cannot list %s: %s", cfg->dir, strerror(-rc));
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        struct stat sb;
        if (ents[i].kind == ENT_TMP) { /* a segment whose creation did not finish */
            unlinkat(j->dfd, ents[i].name, 0);
        } else if (ents[i].kind == ENT_CORRUPT) {
            /* Its intact records may have been replayed: their LSNs must not come again. */
            struct scan s = {.mode = SCAN_CRC};
            high = max64(high, ents[i].lsn);
            if (scan_file(&s, j->dfd, &ents[i], O_RDONLY, NULL) == 0)
                high = max64(high, s.last_lsn);
            scan_free(&s);
        } else if (fstatat(j->dfd, ents[i].name, &sb, 0) != 0) {
            rc = fail(err, -errno, "cannot stat %s: %s", ents[i].name, strerror(errno));
            goto out;
        } else if ((rc = push_segment(j, ents[i].lsn, (uint64_t)sb.st_size)) != 0) {
            rc = fail(err, rc, "out of memory");
            goto out;
        }
    }
    if (j->nsegs > 0 && (rc = open_last(j, &high, err)) != 0)
        goto out;
    j->next_lsn = high + 1;
    j->last_written_lsn = high;
    j->last_sync_ms = (uint64_t)util_clock_ms(CLOCK_MONOTONIC);
    *out = j;
    j = NULL;
out:
    free(ents);
    journal_close(j);
    return rc;
}

int journal_sync(struct journal *j, struct journal_error *err)
{
    if (j->sync_error != 0)
        return fail(err, -EIO, "an earlier fsync failed (%s); reopen the journal",
                    strerror(-j->sync_error));
    if (j->fd < 0 || !j->dirty)
        return 0;
    if (fdatasync(j->fd) != 0) {
        j->sync_error = -errno;
        return fail(err, j->sync_error, "fsync of seg-%016" PRIx64 ".tjl failed: %s",
                    j->segs[j->nsegs - 1].first_lsn, strerror(-j->sync_error));
    }
    j->dirty = false;
    j->last_sync_ms = (uint64_t)util_clock_ms(CLOCK_MONOTONIC);
    return 0;
}

void journal_close(struct journal *j)
{
    if (j == NULL)
        return;
    if (j->cfg.fsync != JOURNAL_FSYNC_NEVER)
        journal_sync(j, NULL);
    if (j->fd >= 0)
        close(j->fd);
    if (j->dfd >= 0)
        close(j->dfd);
    if (j->open != NULL) {
        j->open->pending = false;
        journal_block_free(j->open);
    }
    ZSTD_freeCCtx(j->cctx);
    free(j->zbuf);
    free(j->segs);
    free(j);
}

int journal_append(struct journal *j, uint8_t type, const void *payload, size_t len, uint64_t *lsn)
{
    if (type == 0 || (payload == NULL && len > 0))
        return -EINVAL;
    if (len > JOURNAL_RECORD_MAX)
        return -EMSGSIZE;
    size_t need = REC_HDR + len;
    uint64_t used = atomic_load(&j->disk_bytes) + atomic_load(&j->pending_bytes);
    if (j->cfg.quota_bytes != 0 && used + need > j->cfg.quota_bytes)
        return -ENOSPC;
    struct journal_block *b = j->open;
    if (b != NULL && b->len + need > JOURNAL_OPEN_BLOCK_MAX)
        return -ENOBUFS;
    if (b == NULL) {
        if ((b = calloc(1, sizeof *b)) == NULL)
            return -ENOMEM;
        b->j = j;
        b->pending = true;
        j->open = b;
    }
    if (grow(&b->raw, &b->cap, b->len + need) != 0)
        return -ENOMEM;
    if (b->count == 0) {
        b->first_lsn = b->done_lsn = j->next_lsn;
        b->wall_ms = (uint64_t)util_clock_ms(CLOCK_REALTIME);
    }
    uint8_t *p = b->raw + b->len;
    p[0] = type;
    util_put_le32(p + 1, (uint32_t)len);
    if (len > 0)
        memcpy(p + REC_HDR, payload, len);
    b->len += need;
    b->count++;
    atomic_fetch_add(&j->pending_bytes, need);
    *lsn = j->next_lsn++;
    return 0;
}

struct journal_block *journal_seal(struct journal *j)
{
    struct journal_block *b = j->open;
    if (b == NULL || b->count == 0)
        return NULL;
    j->open = NULL;
    return b;
}

uint64_t journal_block_first_lsn(const struct journal_block *b)
{
    return b->first_lsn;
}

uint64_t journal_block_last_lsn(const struct journal_block *b)
{
    return b->first_lsn + b->count - 1;
}

uint64_t journal_block_records(const struct journal_block *b)
{
    return b->count;
}

void journal_block_free(struct journal_block *b)
{
    if (b == NULL)
        return;
    if (b->pending)
        atomic_fetch_sub(&b->j->pending_bytes, b->len);
    free(b->raw);
    free(b);
}

/* Closes the current segment and starts seg-<lsn>.tjl, created as .tmp and renamed whole. */
static int rotate(struct journal *j, uint64_t lsn, struct journal_error *err)
{
    char name[NAME_CAP], tmp[NAME_CAP + 8];
    uint8_t h[SEG_HDR];
    bool sync = j->cfg.fsync != JOURNAL_FSYNC_NEVER, named = false;
    int rc, fd;

    if (j->fd >= 0) {
        if (sync && (rc = journal_sync(j, err)) != 0)
            return rc;
        close(j->fd);
        j->fd = -1;
    }
    seg_name(name, lsn);
    snprintf(tmp, sizeof tmp, "%s.tmp", name);
    memcpy(h, SEG_MAGIC, 8);
    util_put_le32(h + 8, SEG_VERSION);
    util_put_le32(h + 12, 0);
    util_put_le64(h + 16, lsn);
    util_put_le64(h + 24, (uint64_t)util_clock_ms(CLOCK_REALTIME));
    util_put_le32(h + 32, journal_crc32c(0, h, 32));
    if ((fd = openat(j->dfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0)
        return fail(err, -errno, "cannot create %s: %s", tmp, strerror(errno));
    if ((rc = io_full(fd, h, SEG_HDR, 0, true)) == 0 && sync && fdatasync(fd) != 0)
        rc = -errno;
    if (rc == 0 && (rc = move_noreplace(j->dfd, tmp, name)) == 0) {
        named = true;
        if (sync && fsync(j->dfd) != 0)
            rc = -errno;
    }
    if (rc == 0 && (rc = push_segment(j, lsn, SEG_HDR)) == 0) {
        j->fd = fd;
        j->dirty = j->broken = false;
        return 0;
    }
    unlinkat(j->dfd, named ? name : tmp, 0);
    close(fd);
    return fail(err, rc, "cannot start %s: %s", name, strerror(-rc));
}

/* Writes records raw[0..n) (count of them, from lsn) as one disk block. */
static int write_disk_block(struct journal *j, uint8_t *raw, size_t n, uint64_t lsn, uint32_t count,
                            uint64_t wall_ms, struct journal_error *err)
{
    size_t bound = j->cctx != NULL ? ZSTD_compressBound(n) : 0, slen = n;
    uint8_t *stored = raw, *h;
    uint32_t flags = 0;
    int rc;

    if (grow(&j->zbuf, &j->zcap, BLK_HDR + bound) != 0)
        return fail(err, -ENOMEM, "out of memory");
    h = j->zbuf;
    if (j->cctx != NULL) {
        size_t z = ZSTD_compressCCtx(j->cctx, h + BLK_HDR, bound, raw, n, j->cfg.zstd_level);
        if (!ZSTD_isError(z) && z < n) /* else the raw bytes are stored: never larger */
            stored = h + BLK_HDR, slen = z, flags = BLK_COMPRESSED;
    }
    memcpy(h, BLK_MAGIC, 4);
    util_put_le32(h + 4, flags);
    util_put_le32(h + 8, (uint32_t)slen);
    util_put_le32(h + 12, (uint32_t)n);
    util_put_le64(h + 16, lsn);
    util_put_le32(h + 24, count);
    util_put_le32(h + 28, 0);
    util_put_le64(h + 32, wall_ms);
    util_put_le32(h + 40, journal_crc32c(journal_crc32c(0, h, 40), stored, slen));
    util_put_le32(h + 44, journal_crc32c(0, h, 44));

    uint64_t total = BLK_HDR + (uint64_t)slen;
    struct segment *cur = j->nsegs > 0 ? &j->segs[j->nsegs - 1] : NULL;
    if (j->fd < 0 || j->broken ||
        (cur->size > SEG_HDR && cur->size + total > j->cfg.segment_bytes)) {
        if ((rc = rotate(j, lsn, err)) != 0)
            return rc;
        cur = &j->segs[j->nsegs - 1];
    }
    if (stored != raw)
        rc = io_full(j->fd, h, total, cur->size, true);
    else if ((rc = io_full(j->fd, h, BLK_HDR, cur->size, true)) == 0) /* from two buffers */
        rc = io_full(j->fd, raw, slen, cur->size + BLK_HDR, true);
    if (rc != 0) {
        if (ftruncate(j->fd, (off_t)cur->size) != 0)
            j->broken = true; /* a partial block must not get anything after it */
        return fail(err, rc, "write to seg-%016" PRIx64 ".tjl failed: %s", cur->first_lsn,
                    strerror(-rc));
    }
    cur->size += total;
    atomic_fetch_add(&j->disk_bytes, total);
    j->dirty = true;
    return 0;
}

int journal_write_block(struct journal *j, struct journal_block *b, struct journal_error *err)
{
    int rc;
    assert(b->j == j);
    if (j->sync_error != 0)
        return fail(err, -EIO, "an earlier fsync failed (%s); reopen the journal",
                    strerror(-j->sync_error));
    if (b->done < b->len && b->done_lsn <= j->last_written_lsn)
        return fail(err, -EINVAL, "block LSN %" PRIu64 " is not after the last written %" PRIu64,
                    b->done_lsn, j->last_written_lsn);
    while (b->done < b->len) {
        size_t n = 0;
        uint32_t count = 0;
        while (b->done + n < b->len) {
            size_t rec = REC_HDR + util_get_le32(b->raw + b->done + n + 1);
            if (count > 0 && n + rec > BLK_RAW_TARGET)
                break;
            n += rec, count++;
        }
        if ((rc = write_disk_block(j, b->raw + b->done, n, b->done_lsn, count, b->wall_ms, err)))
            return rc;
        b->done += n;
        b->done_lsn += count;
        j->last_written_lsn = b->done_lsn - 1;
    }
    if (b->pending) {
        atomic_fetch_sub(&j->pending_bytes, b->len);
        b->pending = false;
    }
    if (j->cfg.fsync == JOURNAL_FSYNC_ALWAYS ||
        (j->cfg.fsync == JOURNAL_FSYNC_INTERVAL &&
         (uint64_t)util_clock_ms(CLOCK_MONOTONIC) - j->last_sync_ms >= j->cfg.fsync_interval_ms))
        return journal_sync(j, err);
    return 0;
}

int journal_release(struct journal *j, uint64_t lsn)
{
    size_t k = 0;
    int rc = 0;
    /* Segment k holds LSNs below segment k + 1's first; the last one is being written. */
    while (k + 1 < j->nsegs && j->segs[k + 1].first_lsn - 1 <= lsn) {
        char name[NAME_CAP];
        seg_name(name, j->segs[k].first_lsn);
        if (unlinkat(j->dfd, name, 0) != 0 && errno != ENOENT) {
            rc = -errno;
            break;
        }
        atomic_fetch_sub(&j->disk_bytes, j->segs[k].size);
        k++;
    }
    if (k > 0) {
        memmove(j->segs, j->segs + k, (j->nsegs - k) * sizeof *j->segs);
        j->nsegs -= k;
    }
    return rc != 0 ? rc : (int)k;
}

void journal_usage(const struct journal *j, struct journal_usage *u)
{
    u->disk_bytes = atomic_load(&j->disk_bytes);
    u->pending_bytes = atomic_load(&j->pending_bytes);
    u->next_lsn = j->next_lsn;
}

/* ---- replay, verify, status -------------------------------------------------- */

/* One pass over a directory's live segments, for replay (fix) or a report (out). */
struct walk {
    struct scan s;
    bool fix;  /* move bad segments aside */
    FILE *out; /* a line per file */
    struct journal_replay_stats st;
    uint64_t disk, first, last;
    int problems;
};

static int walk_dir(const char *dir, struct walk *w, struct journal_error *err)
{
    struct ent *ents = NULL;
    size_t n = 0, last = SIZE_MAX;
    int rc = 0, dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    if (dfd < 0)
        return errno == ENOENT && w->fix
                   ? 0
                   : fail(err, -errno, "cannot open %s: %s", dir, strerror(errno));
    if ((rc = list_dir(dfd, &ents, &n)) != 0)
        rc = fail(err, rc, "cannot list %s: %s", dir, strerror(-rc));
    for (size_t i = 0; i < n; i++)
        last = ents[i].kind == ENT_LIVE ? i : last;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const struct ent *e = &ents[i];
        struct stat sb;
        char moved[NAME_CAP + 24];
        if (w->out != NULL && e->kind == ENT_CORRUPT && fstatat(dfd, e->name, &sb, 0) == 0)
            fprintf(w->out, "  %s: quarantined, %jd bytes\n", e->name, (intmax_t)sb.st_size);
        if (e->kind != ENT_LIVE)
            continue;
        if ((rc = scan_file(&w->s, dfd, e, O_RDONLY, NULL)) != 0) {
            rc = fail(err, rc, "cannot read %s/%s: %s", dir, e->name, strerror(-rc));
            break;
        }
        w->st.segments++;
        w->st.records += w->s.records;
        w->st.bytes += w->s.bytes;
        if (w->s.oldest_ms != 0 && (w->st.oldest_ms == 0 || w->s.oldest_ms < w->st.oldest_ms))
            w->st.oldest_ms = w->s.oldest_ms;
        w->disk += w->s.size;
        w->first = w->first ? w->first : w->s.first_lsn;
        w->last = w->s.last_lsn ? w->s.last_lsn : w->last;
        if ((rc = w->s.cb_rc) != 0)
            break;
        bool torn = w->s.status == SEG_TORN && i == last;
        const char *verdict = w->s.status == SEG_OK ? "ok" : torn ? "torn tail at " : "CORRUPT at ";
        if (w->out != NULL)
            fprintf(w->out,
                    "  %s: %" PRIu64 " bytes, %" PRIu64 " blocks, %" PRIu64 " records, LSN %" PRIu64
                    "..%" PRIu64 ": %s%s\n",
                    e->name, w->s.size, w->s.blocks, w->s.records, w->s.first_lsn, w->s.last_lsn,
                    verdict, w->s.status == SEG_OK ? "" : w->s.why);
        if (w->s.status == SEG_OK)
            continue;
        w->problems++;
        if (torn) {
            w->st.torn_tail_bytes += w->s.size - w->s.end;
            snprintf(w->st.last_problem, sizeof w->st.last_problem,
                     "%s: torn tail of %" PRIu64 " bytes at %s", e->name, w->s.size - w->s.end,
                     w->s.why);
        } else if (w->fix) {
            if ((rc = quarantine(dfd, e->name, moved, sizeof moved)) != 0)
                rc = fail(err, rc, "cannot move %s/%s aside: %s", dir, e->name, strerror(-rc));
            w->st.quarantined += rc == 0;
            snprintf(w->st.last_problem, sizeof w->st.last_problem, "%s moved to %s: %.100s",
                     e->name, moved, w->s.why);
        }
    }
    free(ents);
    close(dfd);
    return rc;
}

int journal_replay(const char *dir, journal_record_cb cb, void *ctx,
                   struct journal_replay_stats *st, struct journal_error *err)
{
    struct walk w = {.s = {.mode = SCAN_FULL, .cb = cb, .ctx = ctx}, .fix = true};
    int rc = walk_dir(dir, &w, err);
    if (st != NULL)
        *st = w.st;
    scan_free(&w.s);
    return rc;
}

/* verify (SCAN_FULL) and status (SCAN_HEADERS): returns the number of problems or -errno. */
static int report(const char *dir, FILE *out, enum scan_mode mode)
{
    struct walk w = {.s = {.mode = mode}, .out = out};
    struct journal_error err;
    fprintf(out, "journal %s\n", dir);
    int rc = walk_dir(dir, &w, &err);
    scan_free(&w.s);
    if (rc < 0) {
        fprintf(out, "  %s\n", err.message);
        return rc;
    }
    fprintf(out, "segments: %" PRIu64 ", bytes: %" PRIu64 ", records: %" PRIu64, w.st.segments,
            w.disk, w.st.records);
    if (w.st.records > 0)
        fprintf(out, ", LSN %" PRIu64 "..%" PRIu64, w.first, w.last);
    if (w.st.oldest_ms != 0) {
        uint64_t now = (uint64_t)util_clock_ms(CLOCK_REALTIME),
                 age = now > w.st.oldest_ms ? now - w.st.oldest_ms : 0;
        fprintf(out, ", oldest record: %.1f s old", (double)age / 1e3);
    }
    fprintf(out, "\n");
    return w.problems;
}

int journal_verify(const char *dir, FILE *out)
{
    int rc = report(dir, out, SCAN_FULL);
    if (rc >= 0)
        fprintf(out, "verify: %s, %d problem%s\n", rc ? "PROBLEMS FOUND" : "intact", rc,
                rc == 1 ? "" : "s");
    return rc > 0 ? 1 : rc;
}

int journal_status(const char *dir, FILE *out)
{
    int rc = report(dir, out, SCAN_HEADERS);
    return rc > 0 ? 0 : rc;
}
