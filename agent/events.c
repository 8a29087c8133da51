/*
 * MLflow's rules for one client message, on their own: every check MLflow makes before writing
 * (validate.h), then the message's events appended to a batch. start_run is expanded into the
 * run row plus the tags MLflow's client and store add (mlflow.runName, mlflow.user,
 * mlflow.source.name/type). One bad key costs one error and never the rest of its frame or
 * batch. No loop, no writer, no I/O: ingest.c calls this with its open batch, the fuzz target
 * and the unit tests with their own.
 */
#include "events.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "destination.h"
#include "log.h"
#include "stats.h"
#include "validate.h"

static uint64_t *reject_counter(int code)
{
    switch (code) {
    case PROTO_ERR_BAD_UTF8: return &stats.rejected_bad_utf8;
    case PROTO_ERR_BAD_KEY: return &stats.rejected_bad_key;
    case PROTO_ERR_KEY_TOO_LONG: return &stats.rejected_key_too_long;
    case PROTO_ERR_VALUE_TOO_LONG: return &stats.rejected_value_too_long;
    case PROTO_ERR_BAD_RUN_ID: return &stats.rejected_bad_run_id;
    case PROTO_ERR_BAD_TIMESTAMP: return &stats.rejected_bad_timestamp;
    case PROTO_ERR_BAD_STATUS: return &stats.rejected_bad_status;
    case PROTO_ERR_BAD_NAME:
    case PROTO_ERR_RUN_NAME_CONFLICT: return &stats.rejected_bad_name;
    default: return &stats.rejected_protocol;
    }
}

/* Per-message context: where events and errors go. */
struct mctx {
    const struct events_sink *s;
    const struct events_origin *o;
    uint64_t seq;
    struct batch *b;
    int rc;
    bool framed; /* the message's frame is started in b (add_ev) */
};

static void fail(struct mctx *m, uint32_t code, const char *message)
{
    (*reject_counter((int)code))++;
    log_limited(LOG_DEBUG, "[conn %u] rejected event of frame %llu: %s", m->o->conn_id,
                (unsigned long long)m->seq, message);
    m->s->error(m->s->ctx, m->o->conn_id, m->seq, code, message);
}

void events_reject(const struct events_sink *s, const struct events_origin *o, uint64_t seq,
                   uint32_t code, const char *message)
{
    struct mctx m = {s, o, seq, s->b, 0, false};
    fail(&m, code, message);
}

/* A validation error goes to the client as is: the two enums must agree. */
_Static_assert((int)VALIDATE_BAD_UTF8 == (int)PROTO_ERR_BAD_UTF8 &&
                   (int)VALIDATE_BAD_KEY == (int)PROTO_ERR_BAD_KEY &&
                   (int)VALIDATE_KEY_TOO_LONG == (int)PROTO_ERR_KEY_TOO_LONG &&
                   (int)VALIDATE_VALUE_TOO_LONG == (int)PROTO_ERR_VALUE_TOO_LONG &&
                   (int)VALIDATE_BAD_RUN_ID == (int)PROTO_ERR_BAD_RUN_ID &&
                   (int)VALIDATE_BAD_TIMESTAMP == (int)PROTO_ERR_BAD_TIMESTAMP &&
                   (int)VALIDATE_BAD_STATUS == (int)PROTO_ERR_BAD_STATUS &&
                   (int)VALIDATE_BAD_NAME == (int)PROTO_ERR_BAD_NAME,
               "validate_code values are wire error codes");

static void fail_v(struct mctx *m, const struct validate_error *e)
{
    fail(m, (uint32_t)e->code, e->message);
}

/* Appends an event with up to three strings, into ev->str (named by kind in struct ev); NULL
 * on out of memory. */
static struct ev *add_ev(struct mctx *m, int kind, const char *run_id, struct proto_str a,
                         struct proto_str b, struct proto_str c)
{
    struct batch *bt = m->b;
    struct sref sa = {0}, sb = {0}, sc = {0};
    if (batch_str(bt, a.ptr, a.len, &sa) || batch_str(bt, b.ptr, b.len, &sb) ||
        batch_str(bt, c.ptr, c.len, &sc)) {
        m->rc = -ENOMEM;
        return NULL;
    }
    /* One frame per message, and per run (a message names one run, or none). */
    const struct ev_frame *f = bt->nframes ? &bt->frames[bt->nframes - 1] : NULL;
    static const char no_run[PROTO_RUN_ID_LEN];
    if ((!m->framed || memcmp(f->run_id, run_id ? run_id : no_run, PROTO_RUN_ID_LEN) != 0) &&
        batch_frame(bt, m->o->conn_id, m->seq, m->o->lsn, m->s->peer, run_id) != 0) {
        m->rc = -ENOMEM;
        return NULL;
    }
    m->framed = true;
    struct ev *ev = batch_push(bt, kind);
    if (ev == NULL) {
        m->rc = -ENOMEM;
        return NULL;
    }
    ev->serial = (*m->s->next_serial)++;
    ev->str[0] = sa;
    ev->str[1] = sb;
    ev->str[2] = sc;
    stats.events_received++;
    return ev;
}

static struct proto_str pstr(const char *s)
{
    return (struct proto_str){s, (uint32_t)strlen(s)};
}

static const struct proto_str none = {"", 0};

static bool check_run_id(struct mctx *m, struct proto_str id)
{
    struct validate_error e;
    if (validate_run_id(id.ptr, id.len, &e) != 0) {
        fail_v(m, &e);
        return false;
    }
    return true;
}

/* A tag or param after MLflow's key rule and value limit (values are truncated). */
static bool check_kv(struct mctx *m, bool is_param, struct proto_kv *kv)
{
    struct validate_error e;
    size_t keep = kv->value.len;
    if (validate_key(is_param ? "param" : "tag", kv->key.ptr, kv->key.len, &e) != 0) {
        fail_v(m, &e);
        return false;
    }
    int rc = is_param ? validate_param_value(kv->key.ptr, kv->key.len, kv->value.ptr, kv->value.len,
                                             &keep, &e)
                      : validate_tag_value(kv->key.ptr, kv->key.len, kv->value.ptr, kv->value.len,
                                           &keep, &e);
    if (rc != 0) {
        fail_v(m, &e);
        return false;
    }
    kv->value.len = (uint32_t)keep;
    return true;
}

static void add_tag(struct mctx *m, const char *run_id, struct proto_str k, struct proto_str v)
{
    add_ev(m, EV_TAG, run_id, k, v, none);
}

static bool str_eq(struct proto_str s, const char *lit)
{
    return s.len == strlen(lit) && memcmp(s.ptr, lit, s.len) == 0;
}

/*
 * The user a client names for a run (the mlflow.user tag) against the one its
 * socket proves. Unless [agent] trust_client_user is set the socket wins, and
 * a different claim is counted.
 */
static struct proto_str claimed_user(struct mctx *m, struct proto_str claim)
{
    struct proto_str peer = pstr(m->o->user);
    if (m->s->cfg->trust_client_user)
        return claim;
    if (claim.len != peer.len || memcmp(claim.ptr, peer.ptr, peer.len) != 0) {
        stats.identity_overridden++;
        log_limited(LOG_INFO,
                    "[ingest] conn %u claimed mlflow.user \"%.*s\"; using \"%s\" from its uid "
                    "([agent] trust_client_user = false)",
                    m->o->conn_id, (int)(claim.len < 64 ? claim.len : 64), claim.ptr, m->o->user);
    }
    return peer;
}

static void do_start_run(struct mctx *m, const struct proto_msg *msg)
{
    struct validate_error e;
    const char *run_id = msg->u.start_run.run_id.ptr;
    struct proto_str exp = msg->u.start_run.experiment;
    struct proto_str name = msg->u.start_run.run_name;
    bool has_name = msg->u.start_run.has_run_name && name.len > 0;

    if (!check_run_id(m, msg->u.start_run.run_id))
        return;
    if (validate_experiment_name(exp.ptr, exp.len, &e) != 0) {
        fail_v(m, &e);
        return;
    }
    if (validate_timestamp(msg->u.start_run.start_time, &e) != 0) {
        fail_v(m, &e);
        return;
    }
    /* First pass over tags: validity and the name they carry. */
    struct proto_iter it = msg->u.start_run.tags;
    struct proto_kv kv;
    struct proto_str tag_name = {NULL, 0};
    struct proto_str user_claim = {NULL, 0};
    bool has_tag_name = false, has_src_name = false, has_src_type = false, has_user = false;
    while (proto_iter_next_kv(&it, &kv)) {
        if (!check_kv(m, false, &kv))
            return; /* a run is all or nothing: a half-tagged run would mislead */
        if (str_eq(kv.key, "mlflow.user")) {
            user_claim = kv.value;
            has_user = true;
        }
        if (str_eq(kv.key, "mlflow.runName")) {
            tag_name = kv.value;
            has_tag_name = true;
        }
        has_src_name |= str_eq(kv.key, "mlflow.source.name");
        has_src_type |= str_eq(kv.key, "mlflow.source.type");
    }
    if (has_name && has_tag_name &&
        (name.len != tag_name.len || memcmp(name.ptr, tag_name.ptr, name.len) != 0)) {
        char msgbuf[700];
        snprintf(msgbuf, sizeof msgbuf,
                 "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with "
                 "different values (run_name='%.*s', mlflow.runName='%.*s').",
                 (int)(name.len > 250 ? 250 : name.len), name.ptr,
                 (int)(tag_name.len > 250 ? 250 : tag_name.len), tag_name.ptr);
        fail(m, PROTO_ERR_RUN_NAME_CONFLICT, msgbuf);
        return;
    }
    char random_name[32];
    if (!has_name && has_tag_name) {
        name = tag_name;
        has_name = true;
    }
    if (!has_name) {
        events_random_run_name(random_name, sizeof random_name);
        name = pstr(random_name);
    }
    if (validate_run_name(name.ptr, name.len, &e) != 0) {
        fail_v(m, &e);
        return;
    }
    struct proto_str user = has_user ? claimed_user(m, user_claim) : pstr(m->o->user);
    if (msg->u.start_run.has_experiment_id && msg->u.start_run.experiment_id > INT32_MAX) {
        fail(m, PROTO_ERR_RUN_NOT_FOUND, "No Experiment with id beyond 2147483647 exists");
        return;
    }
    struct ev *run = add_ev(m, EV_START_RUN, run_id, exp, name, user);
    if (run == NULL)
        return;
    run->start.ms = msg->u.start_run.start_time;
    run->start.experiment_id =
        msg->u.start_run.has_experiment_id ? (int64_t)msg->u.start_run.experiment_id + 1 : 0;

    it = msg->u.start_run.tags;
    while (proto_iter_next_kv(&it, &kv)) {
        check_kv(m, false, &kv); /* truncates as the first pass did */
        if (str_eq(kv.key, "mlflow.user"))
            continue; /* added below, as decided above */
        add_tag(m, run_id, kv.key, kv.value);
    }
    if (!has_tag_name)
        add_tag(m, run_id, pstr("mlflow.runName"), name);
    if (has_user || m->o->context_tags)
        add_tag(m, run_id, pstr("mlflow.user"), user);
    if (m->o->context_tags && !has_src_name && m->o->source_name[0])
        add_tag(m, run_id, pstr("mlflow.source.name"), pstr(m->o->source_name));
    if (m->o->context_tags && !has_src_type && m->o->source_type[0])
        add_tag(m, run_id, pstr("mlflow.source.type"), pstr(m->o->source_type));
}

static void do_point(struct mctx *m, const char *run_id, const struct proto_point *p)
{
    struct validate_error e;
    if (validate_key("metric", p->key.ptr, p->key.len, &e) != 0 ||
        validate_timestamp(p->timestamp, &e) != 0) {
        fail_v(m, &e);
        return;
    }
    struct ev *ev = add_ev(m, EV_METRIC, run_id, p->key, none, none);
    if (ev == NULL)
        return;
    struct validate_metric_value v = validate_metric_sanitize(p->value);
    ev->point.value = v.value;
    ev->is_nan = v.is_nan;
    ev->point.ts = p->timestamp;
    ev->point.step = p->step;
}

static void do_kvs(struct mctx *m, const struct proto_msg *msg)
{
    bool is_param = msg->kind == PROTO_PARAMS;
    if (!check_run_id(m, msg->u.kvs.run_id))
        return;
    struct proto_iter it = msg->u.kvs.kvs;
    struct proto_kv kv;
    while (m->rc == 0 && proto_iter_next_kv(&it, &kv)) {
        if (!check_kv(m, is_param, &kv))
            continue;
        if (!is_param && str_eq(kv.key, "mlflow.user"))
            kv.value = claimed_user(m, kv.value);
        add_ev(m, is_param ? EV_PARAM : EV_TAG, msg->u.kvs.run_id.ptr, kv.key, kv.value, none);
    }
}

/* A status validate_status() accepted, as enum run_status. */
static uint8_t status_of(struct proto_str st)
{
    for (uint8_t i = RUN_RUNNING; i <= RUN_KILLED; i++)
        if (str_eq(st, run_status_name(i)))
            return i;
    return RUN_RUNNING;
}

static void do_end_run(struct mctx *m, const struct proto_msg *msg)
{
    struct validate_error e;
    if (!check_run_id(m, msg->u.end_run.run_id))
        return;
    struct proto_str st = msg->u.end_run.status;
    if (validate_status(st.ptr, st.len, &e) != 0 ||
        validate_timestamp(msg->u.end_run.end_time, &e) != 0) {
        fail_v(m, &e);
        return;
    }
    struct ev *ev = add_ev(m, EV_END_RUN, msg->u.end_run.run_id.ptr, none, none, none);
    if (ev == NULL)
        return;
    ev->status = status_of(st);
    ev->end_ms = msg->u.end_run.end_time;
}

/* experiments.artifact_location is VARCHAR(256). */
#define ARTIFACT_LOCATION_MAX 256

static void do_experiment(struct mctx *m, const struct proto_msg *msg)
{
    struct validate_error e;
    struct proto_str name = msg->u.experiment.name, loc = none;
    if (validate_experiment_name(name.ptr, name.len, &e) != 0) {
        fail_v(m, &e);
        return;
    }
    if (msg->u.experiment.has_artifact_location) {
        loc = msg->u.experiment.artifact_location;
        size_t cp = validate_utf8_count(loc.ptr, loc.len);
        if (cp == SIZE_MAX || cp > ARTIFACT_LOCATION_MAX) {
            fail(m, PROTO_ERR_BAD_NAME,
                 cp == SIZE_MAX ? "artifact_location is not valid UTF-8"
                                : "artifact_location exceeds the maximum length of 256 characters "
                                  "(experiments.artifact_location)");
            return;
        }
        /* The operator decides where the agent writes and connects, not a client. */
        char why[600];
        if (destination_problem(m->s->cfg, loc.ptr, loc.len, why, sizeof why) != NULL) {
            stats.rejected_destination++;
            fail(m, PROTO_ERR_FORBIDDEN, why);
            return;
        }
    }
    add_ev(m, EV_EXPERIMENT, NULL, name, loc, none);
}

/* MLflow's update_run_info: any of status, end time and name; the name also sets the tag. */
static void do_update_run(struct mctx *m, const struct proto_msg *msg)
{
    struct validate_error e;
    const char *run_id = msg->u.update_run.run_id.ptr;
    if (!check_run_id(m, msg->u.update_run.run_id))
        return;
    struct proto_str st = msg->u.update_run.status, name = msg->u.update_run.run_name;
    if ((msg->u.update_run.has_status && validate_status(st.ptr, st.len, &e) != 0) ||
        (msg->u.update_run.has_end_time &&
         validate_timestamp(msg->u.update_run.end_time, &e) != 0) ||
        (msg->u.update_run.has_run_name && validate_run_name(name.ptr, name.len, &e) != 0)) {
        fail_v(m, &e);
        return;
    }
    if (msg->u.update_run.has_run_name)
        add_tag(m, run_id, pstr("mlflow.runName"), name);
    if (!msg->u.update_run.has_status && !msg->u.update_run.has_end_time)
        return;
    struct ev *ev = add_ev(m, EV_END_RUN, run_id, none, none, none);
    if (ev == NULL)
        return;
    if (msg->u.update_run.has_status)
        ev->status = status_of(st);
    else
        ev->flags |= EV_KEEP_STATUS;
    if (msg->u.update_run.has_end_time)
        ev->end_ms = msg->u.update_run.end_time;
    else
        ev->flags |= EV_KEEP_END;
}

static void begin(struct mctx *m, const struct events_sink *s, const struct events_origin *o,
                  uint64_t seq)
{
    *m = (struct mctx){s, o, seq, s->b, 0, false};
}

uint64_t events_artifact(const struct events_sink *s, const struct events_origin *o, uint64_t seq,
                         const char *run_id, const char *path, const char *id, uint64_t size,
                         const char *sha256)
{
    struct mctx m;
    begin(&m, s, o, seq);
    struct ev *ev = add_ev(&m, EV_ARTIFACT, run_id, pstr(path), pstr(id), pstr(sha256));
    if (ev == NULL)
        return 0; /* out of memory: the caller logs it */
    ev->size = size;
    return ev->serial;
}

int events_artifact_done(const struct events_sink *s, const char *id, const char *status,
                         const char *error)
{
    static const struct events_origin internal = {0, "", "", "", false, 0, NULL};
    struct mctx m;
    begin(&m, s, &internal, 0);
    return add_ev(&m, EV_ARTIFACT_DONE, NULL, pstr(status), pstr(id), pstr(error ? error : ""))
               ? 0
               : -ENOMEM;
}

int events_from_message(const struct events_sink *s, const struct events_origin *o,
                        const struct proto_msg *msg)
{
    struct mctx m;
    begin(&m, s, o, msg->seq);
    struct validate_error e;
    switch (msg->kind) {
    case PROTO_EXPERIMENT: do_experiment(&m, msg); break;
    case PROTO_DELETE_TAG:
        if (!check_run_id(&m, msg->u.delete_tag.run_id))
            break;
        if (validate_key("tag", msg->u.delete_tag.key.ptr, msg->u.delete_tag.key.len, &e) != 0)
            fail_v(&m, &e);
        else
            add_ev(&m, EV_DELETE_TAG, msg->u.delete_tag.run_id.ptr, msg->u.delete_tag.key, none,
                   none);
        break;
    case PROTO_UPDATE_RUN: do_update_run(&m, msg); break;
    case PROTO_START_RUN: do_start_run(&m, msg); break;
    case PROTO_METRIC:
        if (check_run_id(&m, msg->u.metric.run_id))
            do_point(&m, msg->u.metric.run_id.ptr, &msg->u.metric.point);
        break;
    case PROTO_METRICS: {
        if (!check_run_id(&m, msg->u.metrics.run_id))
            break;
        struct proto_iter it = msg->u.metrics.points;
        struct proto_point p;
        while (m.rc == 0 && proto_iter_next_point(&it, &p))
            do_point(&m, msg->u.metrics.run_id.ptr, &p);
        break;
    }
    case PROTO_PARAMS:
    case PROTO_TAGS: do_kvs(&m, msg); break;
    case PROTO_END_RUN: do_end_run(&m, msg); break;
    default: fail(&m, PROTO_ERR_PROTOCOL, "message kind not accepted from clients"); break;
    }
    if (m.rc != 0)
        fail(&m, PROTO_ERR_SHUTDOWN, "agent out of memory; event dropped");
    return m.rc;
}

void events_random_run_name(char *out, size_t len)
{
    static const char *const adjectives[] = {
        "able",   "brave", "calm",  "clever", "bold",  "bright", "eager", "gentle",
        "happy",  "keen",  "lucky", "merry",  "noble", "quick",  "quiet", "sharp",
        "silent", "swift", "tidy",  "vivid",  "wise",  "zesty",  "amber", "polite",
    };
    static const char *const nouns[] = {
        "ant",  "bass", "bat",  "bear", "bird", "carp", "cat",  "colt", "crab", "deer",
        "dove", "duck", "eel",  "elk",  "fish", "fox",  "frog", "goat", "hare", "hawk",
        "lark", "lion", "mole", "moth", "newt", "owl",  "ram",  "seal", "slug", "wolf",
    };
    unsigned r = (unsigned)rand();
    snprintf(out, len, "%s-%s-%u", adjectives[r % 24], nouns[(r / 24) % 30],
             (unsigned)rand() % 1000);
}
