/*
 * libtrackd: log MLflow runs, params, tags and metrics through the local
 * trackd agent without ever waiting for it.
 *
 * Every log call encodes the event into a bounded in-process buffer and
 * returns; a background thread sends the buffer over the agent's Unix socket
 * and reads the agent's replies. trackd_flush() is the barrier: it returns
 * once everything logged before it is committed in PostgreSQL. Errors the
 * agent reports (an invalid key, a changed param) are read with
 * trackd_next_error(). All functions are thread-safe.
 *
 * Return values: 0 on success or a negative errno value:
 *   -EINVAL     bad argument (NULL, a run id that is not 32 hex characters)
 *   -ENOBUFS    the buffer is full and the overflow policy dropped the event
 *   -ETIMEDOUT  trackd_flush() did not see the barrier in time
 *   -EMSGSIZE   the event is larger than the agent accepts in one frame (1 MiB by default)
 *   -ENOMEM     out of memory
 *   -ECHILD     the client was opened by the parent of this (forked) process; open another
 *
 * Timeouts are in milliseconds: trackd_flush() waits forever for a negative one;
 * trackd_close() does not flush for a negative one.
 */
#ifndef TRACKD_H
#define TRACKD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define TRACKD_API __attribute__((visibility("default")))
#else
#define TRACKD_API
#endif

/* The socket used when neither the options nor TRACKD_SOCKET name one. */
#define TRACKD_DEFAULT_SOCKET "/run/trackd/trackd.sock"
/* A run id: 32 lower-case hex characters plus the terminating NUL. */
#define TRACKD_RUN_ID_SIZE 33
/* Pass as a timestamp to mean "now" (epoch milliseconds at the call). */
#define TRACKD_NOW INT64_MIN
/* Pass to trackd_update_run() to keep the stored end time. */
#define TRACKD_KEEP (INT64_MIN + 1)

typedef struct trackd_client trackd_client;

enum trackd_overflow {
    TRACKD_DROP_NEWEST = 0, /* drop the event that does not fit and count it */
    TRACKD_BLOCK = 1        /* wait for space up to block_timeout_ms, then drop */
};

struct trackd_options {
    const char *socket_path; /* NULL: $TRACKD_SOCKET, else TRACKD_DEFAULT_SOCKET */
    size_t buffer_bytes;     /* 0: 16 MiB of encoded events */
    int overflow;            /* enum trackd_overflow */
    int block_timeout_ms;    /* TRACKD_BLOCK only; 0: 1000 */
    int linger_ms;           /* how long the sender lets events accumulate; 0: 5 */
    const char *source_name; /* mlflow.source.name; NULL: argv[0] of this process */
    const char *source_type; /* mlflow.source.type; NULL: "LOCAL" */
    int no_context_tags; /* 1: the agent adds no mlflow.user / mlflow.source.* tags of its own */
};

struct trackd_kv {
    const char *key;
    const char *value;
};

struct trackd_metric {
    const char *key;
    double value;
    int64_t step;
    int64_t timestamp_ms; /* TRACKD_NOW for the time of the call */
};

struct trackd_counters {
    uint64_t queued;      /* events accepted into the buffer */
    uint64_t sent;        /* events written to the agent's socket */
    uint64_t dropped;     /* events refused by the overflow policy (buffer full) */
    uint64_t lost;        /* events in flight when a connection broke, or unsent at close */
    uint64_t errors;      /* error reports received from the agent */
    uint64_t errors_lost; /* error reports not kept because the error queue was full */
    uint64_t reconnects;  /* connections made after the first */
    uint64_t buffered_bytes;
    int connected; /* 1 while a connection to the agent is up */
};

struct trackd_error {
    uint64_t seq;  /* the frame the error is about */
    uint32_t code; /* a wire error code, see proto/PROTOCOL.md */
    char message[1024];
};

/* Creates a client; opts may be NULL. Succeeds even if the agent is not up yet:
 * events are buffered and the client keeps reconnecting. */
TRACKD_API int trackd_open(trackd_client **out, const struct trackd_options *opts);
/* Flushes with timeout_ms (< 0: no flush), stops the sender and frees c. */
TRACKD_API void trackd_close(trackd_client *c, int timeout_ms);

/* Makes a new run id (uuid4-style lower-case hex) into out. */
TRACKD_API int trackd_new_run_id(char out[TRACKD_RUN_ID_SIZE]);
/* Creates the experiment if no experiment has that name. */
TRACKD_API int trackd_create_experiment(trackd_client *c, const char *name);
/* The same, with the artifact location a new experiment gets (NULL: the agent's default). */
TRACKD_API int trackd_create_experiment_at(trackd_client *c, const char *name,
                                           const char *artifact_location);
/*
 * Starts a run in the named experiment (created if missing). run_id must be
 * a fresh id from trackd_new_run_id(); run_name may be NULL (a random name
 * like MLflow's), start_time_ms may be TRACKD_NOW.
 */
TRACKD_API int trackd_start_run(trackd_client *c, const char *run_id, const char *experiment,
                                const char *run_name, int64_t start_time_ms,
                                const struct trackd_kv *tags, size_t ntags);
/*
 * The same in the experiment whose id is experiment_id (>= 0), as MLflow's create_run takes
 * it: the run goes there even if another experiment now has the name, and never creates
 * one. experiment is that experiment's name, for messages. -EINVAL for a negative id.
 */
TRACKD_API int trackd_start_run_in(trackd_client *c, const char *run_id, int64_t experiment_id,
                                   const char *experiment, const char *run_name,
                                   int64_t start_time_ms, const struct trackd_kv *tags,
                                   size_t ntags);
TRACKD_API int trackd_log_metric(trackd_client *c, const char *run_id, const char *key,
                                 double value, int64_t step, int64_t timestamp_ms);
TRACKD_API int trackd_log_metrics(trackd_client *c, const char *run_id,
                                  const struct trackd_metric *metrics, size_t n);
TRACKD_API int trackd_log_param(trackd_client *c, const char *run_id, const char *key,
                                const char *value);
TRACKD_API int trackd_log_params(trackd_client *c, const char *run_id,
                                 const struct trackd_kv *params, size_t n);
TRACKD_API int trackd_set_tag(trackd_client *c, const char *run_id, const char *key,
                              const char *value);
TRACKD_API int trackd_set_tags(trackd_client *c, const char *run_id, const struct trackd_kv *tags,
                               size_t n);
/* Deletes a run tag (a no-op if the run has no such tag). */
TRACKD_API int trackd_delete_tag(trackd_client *c, const char *run_id, const char *key);
/*
 * MLflow's update_run_info: status (NULL keeps it), end_time_ms (TRACKD_KEEP keeps it,
 * TRACKD_NOW is now), run_name (NULL keeps it; also sets the mlflow.runName tag).
 */
TRACKD_API int trackd_update_run(trackd_client *c, const char *run_id, const char *status,
                                 int64_t end_time_ms, const char *run_name);
/*
 * Hands a file to the agent for upload to the run's artifact store, as
 * artifact_path/<file name> (artifact_path NULL or "" = the root). The stored file is the
 * file as it is at this call, byte for byte, or nothing: files up to 1 MiB are copied here
 * (into an anonymous memory file); a larger one travels to the agent as an open descriptor,
 * with the size and modification time it has now, and the agent copies it at once. If it is
 * rewritten in place before that copy is complete, the agent stores nothing and reports error 23
 * ("... changed after log_artifact ..."): write each version to a new file, or call
 * trackd_flush() before rewriting it. A file written in the current clock tick makes this
 * call wait for the next tick (1-10 ms), so that any rewrite changes its modification time.
 * The caller may delete or rename the file right away. flush() returns once the file is
 * uploaded, or its failure is in the error stream. -EISDIR for a directory (see below).
 */
TRACKD_API int trackd_log_artifact(trackd_client *c, const char *run_id, const char *local_path,
                                   const char *artifact_path);
/*
 * Every regular file below local_dir, keeping its relative path under artifact_path.
 * Returns the number of files handed over, or the first error.
 */
TRACKD_API int trackd_log_artifacts(trackd_client *c, const char *run_id, const char *local_dir,
                                    const char *artifact_path);
/* status: "FINISHED" (NULL), "FAILED" or "KILLED"; end_time_ms may be TRACKD_NOW. */
TRACKD_API int trackd_end_run(trackd_client *c, const char *run_id, const char *status,
                              int64_t end_time_ms);

/* Waits until everything logged before the call is committed (timeout_ms < 0: forever). */
TRACKD_API int trackd_flush(trackd_client *c, int timeout_ms);
TRACKD_API void trackd_get_counters(trackd_client *c, struct trackd_counters *out);
/* Pops the oldest error the agent reported: 1 if one was copied to out, 0 if none. */
TRACKD_API int trackd_next_error(trackd_client *c, struct trackd_error *out);
TRACKD_API const char *trackd_strerror(int rc);
/*
 * Copies the MLflow backend store URI the agent announces for reads ([mlflow] backend_uri)
 * into out, waiting up to timeout_ms for the agent's welcome. Returns 0, -ENOENT when the
 * agent announces none, -ETIMEDOUT when no agent answered, -ERANGE when len is too small.
 */
TRACKD_API int trackd_backend_uri(trackd_client *c, char *out, size_t len, int timeout_ms);

#ifdef __cplusplus
}
#endif

#endif
