/*
 * trackd wire protocol: frame header, message kinds, encoders and a bounded,
 * zero-copy decoder. This is the single definition of the format described in
 * proto/PROTOCOL.md; the client shim encodes with it and the agent decodes with
 * it. Nothing here allocates except proto_buf growth, and nothing blocks.
 */
#ifndef TRACKD_PROTO_H
#define TRACKD_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PROTO_VERSION 1
#define PROTO_MAGIC0 0x54 /* 'T' */
#define PROTO_MAGIC1 0x4B /* 'K' */
#define PROTO_HEADER_LEN 16
/* No frame body may exceed this, whatever a peer negotiates. */
#define PROTO_MAX_BODY_HARD (64u * 1024u * 1024u)
/* Deepest msgpack nesting any message uses is 2; leave room, refuse more. */
#define PROTO_MAX_DEPTH 4
#define PROTO_RUN_ID_LEN 32

enum proto_kind {
    PROTO_HELLO = 1,
    PROTO_WELCOME = 2,
    PROTO_EXPERIMENT = 3,
    PROTO_START_RUN = 4,
    PROTO_METRIC = 5,
    PROTO_METRICS = 6,
    PROTO_PARAMS = 7,
    PROTO_TAGS = 8,
    PROTO_END_RUN = 9,
    PROTO_FLUSH = 10,
    PROTO_FLUSHED = 11,
    PROTO_ERROR = 12,
    PROTO_STATS = 13,
    PROTO_STATS_REPLY = 14,
    PROTO_DELETE_TAG = 15,
    PROTO_UPDATE_RUN = 16,
    PROTO_ACK = 17,
    PROTO_ARTIFACT = 18, /* carries one file descriptor (SCM_RIGHTS) */
    PROTO_KIND_MAX = 18
};

/*
 * Codes in ERROR frames (stable on the wire). 1..19 are validation failures
 * and equal the agent's validate_code values.
 */
enum proto_error_code {
    PROTO_ERR_BAD_UTF8 = 1,
    PROTO_ERR_BAD_KEY = 2,
    PROTO_ERR_KEY_TOO_LONG = 3,
    PROTO_ERR_VALUE_TOO_LONG = 4,
    PROTO_ERR_BAD_RUN_ID = 5,
    PROTO_ERR_BAD_TIMESTAMP = 6,
    PROTO_ERR_BAD_STATUS = 7,
    PROTO_ERR_BAD_NAME = 8,
    PROTO_ERR_PARAM_CHANGED = 20, /* a param logged again with another value */
    PROTO_ERR_DATABASE = 21,      /* PostgreSQL rejected the event (e.g. unknown run) */
    PROTO_ERR_RUN_NAME_CONFLICT = 22,
    PROTO_ERR_ARTIFACT = 23,      /* the file could not be taken or uploaded; see the message */
    PROTO_ERR_RUN_NOT_FOUND = 24, /* no run has this id (MLflow: RESOURCE_DOES_NOT_EXIST) */
    PROTO_ERR_NOT_ACTIVE = 25,    /* the run, or the experiment it starts in, is deleted */
    PROTO_ERR_FORBIDDEN = 26,     /* not this client's to do (a destination outside the roots) */
    PROTO_ERR_PROTOCOL = 30,      /* malformed frame; the connection is closed */
    PROTO_ERR_SHUTDOWN = 31       /* agent stopped before the event was written */
};

/*
 * Negative return codes of this module, below every negative errno (Linux's stop above -200;
 * PROTO_ERRNO_MIN in proto.c is -1000): functions of the agent and the shim return 0, a negative
 * errno or one of these, and proto_strerror() names any of them.
 */
enum proto_err {
    PROTO_EBADMAGIC = -1001,
    PROTO_EVERSION = -1002,
    PROTO_ETOOBIG = -1003,
    PROTO_EKIND = -1004,
    PROTO_EMSGPACK = -1005, /* malformed or truncated msgpack */
    PROTO_ESHAPE = -1006,   /* well-formed msgpack of the wrong shape or type */
    PROTO_EDEPTH = -1007,
    PROTO_ENOMEM = -1008,
    PROTO_ETRAILING = -1009 /* bytes left after the body's single object */
};

/* A message for 0, a PROTO_E* code or a negative errno; never NULL. */
const char *proto_strerror(int code);
const char *proto_kind_name(int kind); /* "metrics", ...; "unknown" otherwise */

struct proto_header {
    uint8_t version;
    uint8_t kind;
    uint32_t body_len;
    uint64_t seq;
};

void proto_header_encode(uint8_t out[PROTO_HEADER_LEN], const struct proto_header *h);
/* Checks magic, version, kind range and body_len <= max_body. */
int proto_header_decode(const uint8_t in[PROTO_HEADER_LEN], uint32_t max_body,
                        struct proto_header *h);

/* ---- encoding ---------------------------------------------------------- */

/* A growable byte buffer. limit caps growth (0 = PROTO_MAX_BODY_HARD * 2). */
struct proto_buf {
    uint8_t *data;
    size_t len;
    size_t cap;
    size_t limit;
};

void proto_buf_init(struct proto_buf *b, size_t limit);
void proto_buf_free(struct proto_buf *b);
int proto_buf_reserve(struct proto_buf *b, size_t extra);
/* Drops the first n bytes (sent data). */
void proto_buf_consume(struct proto_buf *b, size_t n);

/* A string argument; ptr need not be NUL-terminated. len 0 with ptr NULL is "". */
struct proto_str {
    const char *ptr;
    uint32_t len;
};

struct proto_kv {
    struct proto_str key;
    struct proto_str value;
};

struct proto_point {
    struct proto_str key;
    double value;
    int64_t timestamp;
    int64_t step;
};

/*
 * Each encoder appends one whole frame to b and returns 0, or a negative code
 * and leaves b as it was. run_id must be PROTO_RUN_ID_LEN bytes.
 */
/*
 * HELLO with the optional fields: context_tags false makes the agent add no mlflow.user /
 * mlflow.source.* tags of its own (MLflow's store API callers send their own); a non-zero
 * session names the client across reconnects, so the agent can drop frames it resent.
 */
int proto_encode_hello_ctx(struct proto_buf *b, uint64_t seq, uint32_t pid,
                           struct proto_str program, struct proto_str source_name,
                           struct proto_str source_type, struct proto_str client, bool context_tags,
                           uint64_t session);
/* ACK: every frame of this session with seq <= acked_seq is accepted (journaled). */
int proto_encode_ack(struct proto_buf *b, uint64_t seq, uint64_t acked_seq);
int proto_encode_hello(struct proto_buf *b, uint64_t seq, uint32_t pid, struct proto_str program,
                       struct proto_str source_name, struct proto_str source_type,
                       struct proto_str client);
int proto_encode_welcome(struct proto_buf *b, uint64_t seq, struct proto_str agent_version,
                         uint32_t max_frame, uint64_t session);
/* WELCOME with the backend store URI clients read from (5th field, omitted when empty). */
int proto_encode_welcome_uri(struct proto_buf *b, uint64_t seq, struct proto_str agent_version,
                             uint32_t max_frame, uint64_t session, struct proto_str backend_uri);
int proto_encode_experiment(struct proto_buf *b, uint64_t seq, struct proto_str name);
/* EXPERIMENT with an artifact location (NULL: the agent's default root + id). */
int proto_encode_experiment_at(struct proto_buf *b, uint64_t seq, struct proto_str name,
                               const struct proto_str *artifact_location);
int proto_encode_delete_tag(struct proto_buf *b, uint64_t seq, const char *run_id,
                            struct proto_str key);
/*
 * What a client saw of a file at the call: its size and modification time (nanoseconds since
 * the epoch, from fstat). The agent keeps the file's bytes only if they are still these when
 * its snapshot is complete. (Not the status-change time: deleting or renaming the file right
 * after the call, which is allowed, changes it.)
 */
struct proto_file_seen {
    uint64_t size;
    uint64_t mtime_ns; /* 0: not sent (an older client) */
};

/*
 * ARTIFACT: the file travels as a descriptor passed with the frame's first byte; path is
 * where it goes below the run's artifact root ("plots/loss.png"), seen what the client saw.
 */
int proto_encode_artifact(struct proto_buf *b, uint64_t seq, const char *run_id,
                          struct proto_str path, const struct proto_file_seen *seen);
/* UPDATE_RUN: each of status, end_time, run_name may be NULL to keep the stored value. */
int proto_encode_update_run(struct proto_buf *b, uint64_t seq, const char *run_id,
                            const struct proto_str *status, const int64_t *end_time,
                            const struct proto_str *run_name);
/* START_RUN: experiment_id NULL starts the run in the experiment named experiment. */
int proto_encode_start_run(struct proto_buf *b, uint64_t seq, const char *run_id,
                           struct proto_str experiment, const struct proto_str *run_name,
                           int64_t start_time, const struct proto_kv *tags, size_t ntags,
                           const uint64_t *experiment_id);
int proto_encode_metric(struct proto_buf *b, uint64_t seq, const char *run_id,
                        const struct proto_point *p);
int proto_encode_kvs(struct proto_buf *b, uint64_t seq, int kind /* PARAMS or TAGS */,
                     const char *run_id, const struct proto_kv *kvs, size_t n);
int proto_encode_end_run(struct proto_buf *b, uint64_t seq, const char *run_id,
                         struct proto_str status, int64_t end_time);
/* FLUSH and STATS have an empty array body. */
int proto_encode_empty(struct proto_buf *b, uint64_t seq, int kind);
int proto_encode_flushed(struct proto_buf *b, uint64_t seq, uint64_t flush_seq, uint64_t errors);
int proto_encode_error(struct proto_buf *b, uint64_t seq, uint64_t about_seq, uint32_t code,
                       struct proto_str message);
/* STATS_REPLY: a map of counter name to unsigned integer. */
int proto_encode_stats_reply(struct proto_buf *b, uint64_t seq, const char *const *names,
                             const uint64_t *values, size_t n);

/*
 * The many-points form is built in place so that a client can keep appending
 * points for the same run to the newest frame: begin writes the header and an
 * empty points array, add appends one point and patches the counts. *frame_off
 * identifies the open frame (its offset in b at begin time).
 */
int proto_metrics_begin(struct proto_buf *b, uint64_t seq, const char *run_id, size_t *frame_off);
int proto_metrics_add(struct proto_buf *b, size_t frame_off, const struct proto_point *p);
/* Points in the open frame starting at frame_off. */
uint32_t proto_metrics_count(const struct proto_buf *b, size_t frame_off);

/* ---- decoding ---------------------------------------------------------- */

/* Iterates a validated flat list (kv pairs or points) inside a body. */
struct proto_iter {
    const uint8_t *pos;
    const uint8_t *end;
    uint32_t left;
};

struct proto_msg {
    uint8_t kind;
    uint64_t seq;
    union {
        struct {
            uint32_t version;
            uint32_t pid;
            struct proto_str program, source_name, source_type, client;
            bool context_tags; /* 7th field; true when absent */
            uint64_t session;  /* 8th field; 0 when absent */
        } hello;
        struct {
            uint32_t version;
            struct proto_str agent_version;
            uint32_t max_frame;
            uint64_t session;
            struct proto_str backend_uri; /* empty when the agent announces none */
        } welcome;
        struct {
            struct proto_str name;
            struct proto_str artifact_location;
            bool has_artifact_location;
        } experiment;
        struct {
            struct proto_str run_id, key;
        } delete_tag;
        struct {
            struct proto_str run_id, path;
            struct proto_file_seen seen; /* mtime_ns = 0 when not sent */
        } artifact;
        struct {
            struct proto_str run_id, status, run_name;
            int64_t end_time;
            bool has_status, has_end_time, has_run_name;
        } update_run;
        struct {
            struct proto_str run_id, experiment, run_name;
            bool has_run_name, has_experiment_id;
            int64_t start_time;
            struct proto_iter tags;
            uint64_t experiment_id;
        } start_run;
        struct {
            struct proto_str run_id;
            struct proto_point point;
        } metric;
        struct {
            struct proto_str run_id;
            struct proto_iter points;
        } metrics;
        struct {
            struct proto_str run_id;
            struct proto_iter kvs;
        } kvs; /* PARAMS and TAGS */
        struct {
            struct proto_str run_id, status;
            int64_t end_time;
        } end_run;
        struct {
            uint64_t flush_seq;
            uint64_t errors;
        } flushed;
        struct {
            uint64_t acked_seq;
        } ack;
        struct {
            uint64_t about_seq;
            uint32_t code;
            struct proto_str message;
        } error;
        struct {
            struct proto_iter pairs; /* name (str), value (uint) */
        } stats;
    } u;
};

/*
 * Decodes and fully validates one frame body: shape, types, counts against the
 * bytes that remain, nesting. On success out's strings and iterators point
 * into body (borrowed: valid while body is). Never allocates.
 */
int proto_msg_decode(const struct proto_header *h, const uint8_t *body, struct proto_msg *out);

/* Iterator steps over a decoded message; they return false at the end. */
bool proto_iter_next_kv(struct proto_iter *it, struct proto_kv *kv);
bool proto_iter_next_point(struct proto_iter *it, struct proto_point *p);
bool proto_iter_next_stat(struct proto_iter *it, struct proto_str *name, uint64_t *value);

/* ---- incremental frame reassembly ------------------------------------- */

/*
 * Collects bytes from a stream and yields whole frames, whatever the split.
 * Memory is bounded by PROTO_HEADER_LEN + max_body + one read chunk.
 */
struct proto_reader {
    uint8_t *data;
    size_t start; /* first unconsumed byte */
    size_t len;   /* end of valid bytes */
    size_t cap;
    uint32_t max_body;
};

void proto_reader_init(struct proto_reader *r, uint32_t max_body);
void proto_reader_free(struct proto_reader *r);
/* Space to read into: at least min bytes, or -PROTO_ENOMEM. */
int proto_reader_space(struct proto_reader *r, size_t min, uint8_t **p, size_t *n);
void proto_reader_commit(struct proto_reader *r, size_t n);
/*
 * Returns 1 and a frame (body borrowed until the next reader call), 0 when
 * more bytes are needed, or a negative code for a bad header.
 */
int proto_reader_next(struct proto_reader *r, struct proto_header *h, const uint8_t **body);
/* Bytes held that do not yet form a whole frame. */
size_t proto_reader_pending(const struct proto_reader *r);

#endif
