/*
 * Event validation with MLflow's own rules (mlflow/utils/validation.py, 3.17.2), applied by the
 * connection layer before an event is journaled and batched, so that a bad event is refused up
 * front instead of failing a COPY. Messages follow MLflow's wording where MLflow has one.
 * Strings are (pointer, byte length) pairs, borrowed, never required to be NUL-terminated;
 * lengths are counted in Unicode code points like Python's len() and PostgreSQL's VARCHAR(n).
 */
#ifndef TRACKD_VALIDATE_H
#define TRACKD_VALIDATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Limits in code points; see reference/mlflow-schema.md §3.6. */
#define VALIDATE_KEY_MAX 250
#define VALIDATE_PARAM_VALUE_MAX 6000
#define VALIDATE_TAG_VALUE_MAX 8000
#define VALIDATE_EXPERIMENT_NAME_MAX 256 /* experiments.name VARCHAR(256); MLflow checks 500 */
#define VALIDATE_RUN_NAME_MAX 250        /* runs.name VARCHAR(250); MLflow does not check */
#define VALIDATE_RUN_ID_LEN 32

/* Error codes, also sent to clients on the wire: keep numeric values stable. */
enum validate_code {
    VALIDATE_OK = 0,
    VALIDATE_BAD_UTF8 = 1,       /* not valid UTF-8, or a NUL byte PostgreSQL cannot store */
    VALIDATE_BAD_KEY = 2,        /* key characters or path rule */
    VALIDATE_KEY_TOO_LONG = 3,   /* > 250 code points */
    VALIDATE_VALUE_TOO_LONG = 4, /* param value > 6000 / tag value > 8000 (truncation off) */
    VALIDATE_BAD_RUN_ID = 5,     /* not 32 lower-case hex */
    VALIDATE_BAD_TIMESTAMP = 6,  /* negative */
    VALIDATE_BAD_STATUS = 7,     /* not RUNNING/SCHEDULED/FINISHED/FAILED/KILLED */
    VALIDATE_BAD_NAME = 8,       /* experiment name empty or > 256, run name > 250 */
};

/* Filled on failure only; message is always NUL-terminated and holds printable text. */
struct validate_error {
    enum validate_code code;
    char message[512];
};

/* Stable upper-case name ("INVALID_KEY", ...) for counters and logs; "UNKNOWN" otherwise. */
const char *validate_code_name(enum validate_code c);

/* Number of code points, or SIZE_MAX when s is not strict UTF-8 (overlong forms, surrogates
 * and values above U+10FFFF are invalid; NUL is a valid code point here). */
size_t validate_utf8_count(const char *s, size_t len);

/* The byte length of the first max code points of s, which must be valid UTF-8 (len when s
 * has no more than max): where to cut a value a column cannot hold whole. */
size_t validate_utf8_prefix(const char *s, size_t len, size_t max);

/*
 * Every validator below returns 0 when the input is acceptable, else -EINVAL with err->code
 * and err->message set. err may be NULL when the caller only wants the verdict.
 */

/* Run ids are made by clients as 32 lower-case hex digits (uuid4().hex). */
int validate_run_id(const char *s, size_t len, struct validate_error *err);

/*
 * Metric, param and tag keys: UTF-8, MLflow's character class `^[/\w.\- :]*$` with Python's
 * Unicode \w, MLflow's path rule, then at most 250 code points. what is "metric", "param"
 * or "tag" and picks MLflow's message for that call.
 */
int validate_key(const char *what, const char *s, size_t len, struct validate_error *err);

/*
 * Param and tag values: UTF-8 without NUL, at most 6000 (param) or 8000 (tag) code points.
 * With keep_len non-NULL a longer value is accepted and *keep_len is set to the byte length of
 * its first 6000/8000 code points, as MLflow does with MLFLOW_TRUNCATE_LONG_VALUES=true (the
 * default); *keep_len == vlen means nothing was cut. With keep_len NULL (truncation off) a
 * longer value fails with VALIDATE_VALUE_TOO_LONG. The key is only used in messages.
 */
int validate_param_value(const char *key, size_t klen, const char *v, size_t vlen, size_t *keep_len,
                         struct validate_error *err);
int validate_tag_value(const char *key, size_t klen, const char *v, size_t vlen, size_t *keep_len,
                       struct validate_error *err);

/* Experiment names: non-empty UTF-8 without NUL, at most 256 code points. */
int validate_experiment_name(const char *s, size_t len, struct validate_error *err);

/* Run names: UTF-8 without NUL, at most 250 code points; empty means "let MLflow's rules pick". */
int validate_run_name(const char *s, size_t len, struct validate_error *err);

/* Epoch milliseconds; MLflow only requires a non-negative number. */
int validate_timestamp(int64_t ts_ms, struct validate_error *err);

/* Exactly one of RUNNING, SCHEDULED, FINISHED, FAILED, KILLED (case-sensitive). */
int validate_status(const char *s, size_t len, struct validate_error *err);

/* MLflow's sanitize_metric_value: the value to store and the is_nan column. */
struct validate_metric_value {
    double value;
    bool is_nan;
};

/* NaN -> (0, true); +Inf -> (DBL_MAX, false); -Inf -> (-DBL_MAX, false); else (v, false). */
struct validate_metric_value validate_metric_sanitize(double v);

#endif
