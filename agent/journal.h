/*
 * The on-disk journal: every acknowledged client frame is appended here before the ack goes out,
 * and whatever PostgreSQL has not committed is replayed from it at start. Records are buffered on
 * the loop thread into an open block, sealed, then compressed, written and fsynced by one worker
 * thread at a time; committed prefixes are released by deleting whole segments. The format is
 * specified in agent/JOURNAL.md.
 */
#ifndef TRACKD_JOURNAL_H
#define TRACKD_JOURNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define JOURNAL_RECORD_MAX (64u << 20)         /* largest payload of one record */
#define JOURNAL_SEGMENT_DEFAULT (64ull << 20)  /* segment_bytes when 0 */
#define JOURNAL_OPEN_BLOCK_MAX (1024ull << 20) /* the open block refuses to grow past this */

enum journal_fsync { JOURNAL_FSYNC_ALWAYS, JOURNAL_FSYNC_INTERVAL, JOURNAL_FSYNC_NEVER };

struct journal_config {
    const char *dir;            /* borrowed for journal_open only; created if missing (0700) */
    uint64_t quota_bytes;       /* segments on disk + records not yet written; 0 = no limit */
    uint64_t segment_bytes;     /* rotate before a segment would grow past this; 0 = 64 MiB */
    int fsync;                  /* enum journal_fsync */
    uint32_t fsync_interval_ms; /* INTERVAL: fsync when the last fsync is older than this */
    int zstd_level;             /* 1 is the agent's default; 0 stores blocks uncompressed */
};

struct journal_error {
    char message[512];
};

struct journal;       /* opaque */
struct journal_block; /* a sealed block: records in LSN order, owned by whoever holds it */

/*
 * Opens dir for appending. Scans the segments only to find the next LSN and the bytes in use (it
 * does not replay: call journal_replay first). A torn tail of the last segment is truncated away;
 * a last segment that is corrupt is moved aside to <name>.corrupt and a new segment is started.
 * Returns 0 and *out (owned; free with journal_close) or -errno with err filled in.
 */
int journal_open(struct journal **out, const struct journal_config *cfg, struct journal_error *err);
/* Fsyncs written data (unless NEVER), frees j and the open block. Sealed blocks must be freed
 * before, and no journal_write_block may be running. */
void journal_close(struct journal *j);

/*
 * Loop thread. Copies one record (type 1..255, len up to JOURNAL_RECORD_MAX) into the open block
 * and stores its LSN in *lsn (monotonic across restarts, starting at 1). Returns 0, -EINVAL (type
 * 0 or NULL payload with len > 0), -EMSGSIZE (len too large), -ENOSPC (quota), -ENOBUFS (the open
 * block is at JOURNAL_OPEN_BLOCK_MAX: seal it) or -ENOMEM.
 */
int journal_append(struct journal *j, uint8_t type, const void *payload, size_t len, uint64_t *lsn);
/* Loop thread. Returns the open block (owned by the caller) or NULL if no record is pending. */
struct journal_block *journal_seal(struct journal *j);
uint64_t journal_block_first_lsn(const struct journal_block *b);
uint64_t journal_block_last_lsn(const struct journal_block *b);
/* Number of records in b. */
uint64_t journal_block_records(const struct journal_block *b);

/*
 * Worker thread, one call at a time per journal: compresses b (in disk blocks of at most 1 MiB
 * raw), appends it to the current segment (rotating at segment_bytes) and fsyncs per policy.
 * Returns 0 once b is written (and durable per policy), or -errno with err. Blocks must be written
 * in LSN order; after a failure the same b may be passed again and resumes where it stopped. After
 * a failed fsync every later write fails with -EIO until the journal is reopened (the kernel may
 * have dropped the pages, so a retried fsync proves nothing). Does not free b.
 */
int journal_write_block(struct journal *j, struct journal_block *b, struct journal_error *err);
/* Worker thread, not concurrently with journal_write_block: fsyncs written data that is not yet
 * durable (INTERVAL: call it from a timer so the last blocks do not wait for the next write).
 * Returns 0 or -errno; -EIO for good after a failed fsync. */
int journal_sync(struct journal *j, struct journal_error *err);
/* Any thread; b must not outlive the journal it came from. NULL is a no-op. */
void journal_block_free(struct journal_block *b);

/*
 * Loop thread (or any thread, but not concurrently with journal_write_block): every record with
 * LSN <= lsn is committed in PostgreSQL. Deletes the whole segments all of whose records are <=
 * lsn, except the segment being written. Returns the number of segments deleted or -errno.
 */
int journal_release(struct journal *j, uint64_t lsn);

struct journal_usage {
    uint64_t disk_bytes;    /* segment files, headers included */
    uint64_t pending_bytes; /* raw bytes appended but not yet written */
    uint64_t next_lsn;      /* loop thread only */
};
/* Loop thread. */
void journal_usage(const struct journal *j, struct journal_usage *u);

/*
 * Replay, at start-up before journal_open: reads the segments in LSN order, verifies every block's
 * CRC32C, decompresses and calls cb for each record in LSN order. A torn tail of the last segment
 * is counted in torn_tail_bytes and skipped. A bad segment header, or a bad block anywhere else,
 * moves the segment aside to <name>.corrupt (never deleted; the records of the blocks before the
 * bad one have been delivered) and replay goes on with the next segment. Returns 0 (also when dir
 * does not exist), cb's non-zero return (which stops the replay), or -errno with err.
 */
typedef int (*journal_record_cb)(void *ctx, uint8_t type, const void *payload, size_t len,
                                 uint64_t lsn);
struct journal_replay_stats {
    uint64_t segments;        /* segment files read, quarantined ones included */
    uint64_t records;         /* records delivered to cb */
    uint64_t bytes;           /* payload bytes delivered to cb */
    uint64_t torn_tail_bytes; /* bytes after the last intact block of the last segment */
    uint64_t quarantined;     /* segments moved aside */
    uint64_t oldest_ms;       /* wall-clock ms of the oldest delivered block; 0 if none */
    char last_problem[256];   /* the last torn tail or quarantine, for the log; "" if none */
};
int journal_replay(const char *dir, journal_record_cb cb, void *ctx,
                   struct journal_replay_stats *st, struct journal_error *err);

/*
 * For `trackd journal verify` and `trackd journal status`: a human-readable report to out. Neither
 * moves nor changes any file. verify decodes every record and returns 0 if every segment is intact,
 * 1 if problems (corruption, torn tail) were found, or -errno. status reads block headers only and
 * prints segments, bytes, records and the oldest record's age; it returns 0 or -errno.
 */
int journal_verify(const char *dir, FILE *out);
int journal_status(const char *dir, FILE *out);

/* CRC32C (Castagnoli). Start with crc = 0; pass the previous result to continue. */
uint32_t journal_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
