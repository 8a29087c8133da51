/*
 * The artifact spool: `<journal dir>/artifacts`, where each artifact a client hands over is
 * kept until its upload is recorded, so the client may delete its file and a crash loses
 * nothing. One artifact is two files: <id>.data, the bytes, and <id>.meta, one line of what the
 * upload needs after a restart (id, run, size, SHA-256, the client's identity, path); both are
 * written under a temporary name, fsynced and renamed into place, the .meta last.
 *
 * Everything here is plain blocking file I/O with no loop and no shared state: the copy,
 * the checks and the deletes run on worker threads (uploader.c), spool_recover at start.
 */
#ifndef TRACKD_SPOOL_H
#define TRACKD_SPOOL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "identity.h"
#include "trackd_proto.h"

#define ARTIFACT_PATH_MAX 1024
/* Free space the spool leaves on its file system (for the journal), in bytes; on a file
 * system smaller than 8 GiB, an eighth of it. */
#define SPOOL_RESERVE (1024ull * 1024 * 1024)

struct spool {
    char dir[4096];
    /* How fast copies on worker threads may go, in bytes per second (0: as fast as the disk);
     * set on the loop every second from what the event stream needs (spool_pace_rate), so a
     * large artifact leaves the disk and the cores to it. */
    _Atomic uint64_t pace_bytes_per_s;
};

/* The copy rates, in bytes per second: while events are being written, and while they back
 * up (the writers are behind by a quarter of batch.max_pending_bytes or more). */
#define SPOOL_PACE_STREAMING (16ull << 20)
#define SPOOL_PACE_BACKLOG (8ull << 20)

/* The pace for copies given the event stream: rows committed in the last second, events not
 * yet committed and their bytes, against the pending bound (batch.max_pending_bytes). */
uint64_t spool_pace_rate(uint64_t rows_per_sec, uint64_t queue_events, uint64_t queue_bytes,
                         uint64_t max_pending_bytes);

/* Events came in: copies go at no more than the streaming pace until the next second's
 * spool_pace_rate, so a stream's first second (before the agent has counted any of it) does
 * not meet a copy at full speed. Called on the loop, for every message. */
void spool_pace_events(struct spool *s);

/* How long a copy that has moved bytes in elapsed_us at bytes_per_s (> 0) waits before going
 * on, in microseconds (0: it is behind that rate). */
int64_t spool_pace_wait_us(uint64_t bytes, int64_t elapsed_us, uint64_t bytes_per_s);

/* What the spool keeps of one artifact: its .meta record, and the size and hash of its .data. */
struct spool_entry {
    char id[40]; /* "<session hex>-<seq hex>": unique per client frame */
    char run_id[PROTO_RUN_ID_LEN + 1];
    char path[ARTIFACT_PATH_MAX + 1]; /* relative to the run's artifact root */
    char sha256[65];                  /* hex */
    uint64_t size;                    /* bytes */
    bool has_peer;                    /* false: a record written before identities were kept */
    struct peer peer;
    char user[64];
};

/* Names the spool below journal_dir and creates its directory (0700). 0 or -errno with msg. */
int spool_open(struct spool *s, const char *journal_dir, char *msg, size_t msglen);
/* out = "<dir>/<id><ext>". */
void spool_file(const struct spool *s, const char *id, const char *ext, char *out, size_t n);

/*
 * Worker thread, before a copy: what must not be waited for on a loop (a stat of the client's
 * file may block on NFS or FUSE; statvfs and access on a busy disk). Sets e->size to the file's
 * size. 0 to copy; -EEXIST the spool holds e->id already (a resend after a restart); -EBADF fd
 * is not a regular file; -EFBIG no room even in an empty spool (its file system's size less
 * the journal's reserve, SPOOL_RESERVE); -ENOSPC no room now.
 */
int spool_check(const struct spool *s, struct spool_entry *e, int fd, char *msg, size_t msglen);
/*
 * Worker thread: copies fd (read with pread, so the client's offset is untouched) into the
 * spool with its SHA-256, checks the file is still what the client saw at the call (seen:
 * size and mtime; -ESTALE otherwise, nothing kept), fsyncs, and writes e's record. Sets
 * e->size and e->sha256. 0, or -errno with msg and nothing left in the spool; -ENOSPC or
 * -EDQUOT: the disk filled during the copy.
 */
int spool_copy(const struct spool *s, struct spool_entry *e, int fd,
               const struct proto_file_seen *seen, char *msg, size_t msglen);
/* Worker thread: copies the first size bytes of id's .data to out (copy_file_range where the
 * kernel can, else through a buffer), starting writeback as it goes. 0 or -errno; msg says so
 * when the spool copy itself cannot be opened, and is left alone otherwise. */
int spool_copy_out(const struct spool *s, const char *id, int out, uint64_t size, char *msg,
                   size_t msglen);
/* Worker thread: deletes id's two files. 0 or -errno with msg naming the file. */
int spool_remove(const struct spool *s, const char *id, char *msg, size_t msglen);

/*
 * At start: each complete record goes to cb, in no particular order. cb returns 0 when it took
 * the record, 1 when it skipped it, -errno to stop. Partial copies of a snapshot cut short are
 * deleted; records that are not valid are left in place with a warning. Returns the number of
 * records taken, or -errno when the directory cannot be read.
 */
int spool_recover(const struct spool *s, int (*cb)(void *ctx, const struct spool_entry *e),
                  void *ctx);

#endif
