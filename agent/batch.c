/*
 * Event storage and per-range statement inputs. The SQL here mirrors what
 * MLflow's SqlAlchemyStore writes (reference/mlflow-schema.md §3): runs as
 * create_run fills them, tags upserted with last-wins, params immutable,
 * metrics deduplicated on the full primary key, latest_metrics by the strict
 * (step, timestamp, value) rule with keys locked in one global order.
 */
#include "batch.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "validate.h"

const char *ev_kind_name(int kind)
{
    switch (kind) {
#define EV_KIND_NAME(name, text)                                                                   \
    case EV_##name: return text;
        EV_KINDS(EV_KIND_NAME)
#undef EV_KIND_NAME
    }
    return "unknown";
}

const char *run_status_name(int status)
{
    static const char *const names[] = {"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"};
    return status >= 0 && status <= RUN_KILLED ? names[status] : "RUNNING";
}

void batch_init(struct batch *b)
{
    memset(b, 0, sizeof *b);
}

_Static_assert(sizeof(struct ev) == 64, "an event is 64 bytes: the pending bound holds twice the "
                                        "points it did at 120");

void batch_free(struct batch *b)
{
    free(b->evs);
    free(b->frames);
    free(b->peers);
    free(b->arena);
    batch_init(b);
}

size_t batch_bytes(const struct batch *b)
{
    return b->cap * sizeof(struct ev) + b->capframes * sizeof(struct ev_frame) +
           b->cappeers * sizeof(struct batch_peer) + b->acap + sizeof *b;
}

static bool same_peer(const struct batch *b, const struct batch_peer *e, const struct peer *p,
                      const char *user, size_t ulen)
{
    return e->id.uid == p->uid && e->id.nshared == p->nshared &&
           memcmp(e->id.shared, p->shared, p->nshared * sizeof p->shared[0]) == 0 &&
           e->user.len == ulen && (ulen == 0 || memcmp(batch_sptr(b, e->user), user, ulen) == 0);
}

uint16_t batch_peer(struct batch *b, const struct peer *p, const char *user)
{
    size_t ulen = strlen(user);
    /* Newest first: a batch is mostly one client's frames in a row. */
    for (size_t i = b->npeers; i > 0; i--)
        if (same_peer(b, &b->peers[i - 1], p, user, ulen))
            return (uint16_t)i;
    if (b->npeers >= BATCH_PEERS_MAX)
        return 0;
    struct batch_peer *grown = util_grow(b->peers, &b->cappeers, b->npeers, sizeof *grown, 4);
    if (grown == NULL)
        return 0;
    b->peers = grown;
    struct batch_peer *e = &b->peers[b->npeers];
    if (batch_str(b, user, ulen, &e->user) != 0)
        return 0;
    e->id = *p;
    return (uint16_t)++b->npeers;
}

int batch_frame(struct batch *b, uint32_t conn_id, uint64_t seq, uint64_t lsn, uint16_t peer,
                const char *run_id)
{
    struct ev_frame *f = util_grow(b->frames, &b->capframes, b->nframes, sizeof *f, 64);
    if (f == NULL || b->nframes >= UINT32_MAX)
        return -ENOMEM;
    b->frames = f;
    f = &b->frames[b->nframes++];
    *f = (struct ev_frame){seq, lsn, conn_id, peer, {0}};
    if (run_id)
        memcpy(f->run_id, run_id, PROTO_RUN_ID_LEN);
    return 0;
}

struct ev *batch_push(struct batch *b, int kind)
{
    if (b->nframes == 0 && batch_frame(b, 0, 0, 0, 0, NULL) != 0)
        return NULL;
    if (b->n == b->cap) {
        /* Doubling, but never past max_rows: a full batch's array has no empty tail. */
        size_t cap = b->cap ? b->cap * 2 : 256;
        if (b->max_rows && cap > b->max_rows && b->n < b->max_rows)
            cap = b->max_rows;
        if (cap > SIZE_MAX / sizeof *b->evs)
            return NULL;
        struct ev *evs = realloc(b->evs, cap * sizeof *evs);
        if (evs == NULL)
            return NULL;
        b->evs = evs;
        b->cap = cap;
    }
    struct ev *ev = &b->evs[b->n++];
    memset(ev, 0, sizeof *ev);
    ev->kind = (uint8_t)kind;
    ev->frame = (uint32_t)(b->nframes - 1);
    if (kind == EV_METRIC)
        b->n_metrics++;
    return ev;
}

int batch_str(struct batch *b, const char *s, size_t len, struct sref *out)
{
    if (len > UINT32_MAX || b->alen + len > UINT32_MAX)
        return -ENOMEM;
    if (b->alen + len > b->acap) {
        size_t cap = b->acap ? b->acap : 16384;
        while (cap < b->alen + len)
            cap *= 2;
        char *a = realloc(b->arena, cap);
        if (a == NULL)
            return -ENOMEM;
        b->arena = a;
        b->acap = cap;
    }
    if (len > 0) /* an empty string may come before the arena exists */
        memcpy(b->arena + b->alen, s, len);
    out->off = (uint32_t)b->alen;
    out->len = (uint32_t)len;
    b->alen += len;
    return 0;
}

/* ---- SQL ---------------------------------------------------------------- */

/*
 * The staging table is temporary and emptied at commit, so no state crosses
 * a transaction: each transaction creates it if its server session lacks it,
 * which keeps PgBouncer's transaction pooling safe.
 */
const char batch_sql_begin_copy[] =
    "BEGIN;"
    "SET LOCAL client_min_messages = warning;"
    "CREATE TEMP TABLE IF NOT EXISTS trackd_stage_metrics ("
    " key text, value float8, \"timestamp\" int8, run_uuid text, step int8, is_nan bool,"
    " ord int4) ON COMMIT DELETE ROWS;"
    "COPY trackd_stage_metrics " BATCH_METRIC_COLUMNS " FROM STDIN (FORMAT binary)";

/*
 * The direct form: the range's points go straight into metrics when they cannot conflict
 * (writer.c says when). The guard, after the range's run starts, names the range's runs that
 * are missing or not active; the writer rolls back instead of the COPY when it names any. The
 * active ones stay locked (FOR SHARE) until COMMIT: a delete_run in between waits, instead of
 * finding the COPY's rows committed under a deleted run.
 */
const char batch_sql_direct_guard[] =
    "WITH active AS (SELECT run_uuid FROM runs WHERE run_uuid = ANY($1::text[])"
    "  AND lifecycle_stage = 'active' FOR SHARE)"
    " SELECT u.run FROM unnest($1::text[]) AS u(run)"
    " WHERE u.run NOT IN (SELECT run_uuid FROM active)";
const char batch_sql_direct_copy[] =
    "COPY metrics " BATCH_METRIC_COLUMNS " FROM STDIN (FORMAT binary)";

/*
 * Since MLflow 3.10 (revision 1b5f0d9ad7c1) an experiment's name is unique per workspace and
 * trackd writes the 'default' one; before, names are unique alone. IN_WORKSPACE(x) is the
 * condition a statement adds on experiments alias x, WS_COLUMN and WS_VALUE the column the
 * insert fills; each statement below exists in both forms, indexed by enum batch_schema.
 */
/* Not formatted: clang-format would split the in_ws("x") calls inside the SQL texts. */
/* clang-format off */
#define IN_WORKSPACE(x) " AND " x ".workspace = 'default'"
#define WS_COLUMN ", workspace"
#define WS_VALUE ", 'default'"
#define NO_WORKSPACE(x) ""
#define BOTH_SCHEMAS(stmt)                                                                         \
    {[BATCH_SCHEMA_NAME] = stmt(NO_WORKSPACE, "", ""),                                             \
     [BATCH_SCHEMA_WORKSPACE] = stmt(IN_WORKSPACE, WS_COLUMN, WS_VALUE)}

/* Experiment ids come from MLflow's sequence only when the name is new. */
#define EXPERIMENTS_SQL(in_ws, ws_column, ws_value)                                                \
    "WITH want AS (SELECT DISTINCT ON (name) name, loc"                                            \
    "  FROM unnest($1::text[], $4::text[]) WITH ORDINALITY AS u(name, loc, i) ORDER BY name, i),"  \
    " missing AS (SELECT w.name, w.loc FROM want w WHERE NOT EXISTS"                               \
    "  (SELECT 1 FROM experiments e WHERE e.name = w.name" in_ws(                                  \
        "e") ")),"                                                                                 \
             " ids AS (SELECT name, loc, nextval('experiments_experiment_id_seq') AS id FROM "     \
             "missing)"                                                                            \
             " INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage,"  \
             "  creation_time, last_update_time" ws_column ")"                                     \
             " SELECT id, name, CASE WHEN loc = '' THEN $2 || id ELSE loc END, 'active', "         \
             "$3::int8,"                                                                           \
             "  $3::int8" ws_value " FROM ids"                                                     \
             " ON CONFLICT DO NOTHING"
const char *const batch_sql_experiments[BATCH_SCHEMA_COUNT] = BOTH_SCHEMAS(EXPERIMENTS_SQL);

/*
 * As SqlAlchemyStore.create_run: artifact_uri = <location>/<run>/artifacts, in the experiment
 * with the id the client gave, else the one with the name; never in a deleted one.
 */
#define RUNS_INSERT(in_ws)                                                                         \
    "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id,"       \
    " status, start_time, end_time, source_version, lifecycle_stage, artifact_uri,"                \
    " experiment_id, deleted_time)"                                                                \
    " SELECT r.id, r.name, 'UNKNOWN', '', '', r.uid, 'RUNNING', r.st, NULL, '', 'active',"         \
    "  e.artifact_location || CASE WHEN right(e.artifact_location, 1) = '/' THEN '' ELSE '/'"      \
    "  END || r.id || '/artifacts', e.experiment_id, NULL"                                         \
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[])"         \
    "  AS r(id, name, uid, st, exp, eid)"                                                          \
    " JOIN experiments e ON ((r.eid IS NULL AND e.name = r.exp" in_ws("e") ")"                    \
    "  OR e.experiment_id = r.eid) AND e.lifecycle_stage = 'active'"                               \
    " ON CONFLICT (run_uuid) DO NOTHING"

#define RUNS_SQL(in_ws, ws_column, ws_value) RUNS_INSERT(in_ws)
const char *const batch_sql_runs[BATCH_SCHEMA_COUNT] = BOTH_SCHEMAS(RUNS_SQL);

/*
 * The same, and who started each run it creates (agent/owners.h): only runs this statement
 * inserted get a row, from the first start of each in the range, so a start re-sent for a run
 * that already exists never claims it, and an owner never changes.
 */
#define RUNS_OWNED_SQL(in_ws, ws_column, ws_value)                                                 \
    "WITH made AS (" RUNS_INSERT(                                                                  \
        in_ws) " RETURNING run_uuid)"                                                              \
               " INSERT INTO trackd_run_owners (run_uuid, uid, shared_gids, created_time)"         \
               " SELECT DISTINCT ON (o.run) o.run, o.uid, o.gids::int8[], $10::int8"               \
               " FROM unnest($7::text[], $8::int8[], $9::text[]) WITH ORDINALITY AS o(run, uid, "  \
               "gids, i)"                                                                          \
               " JOIN made ON made.run_uuid = o.run"                                               \
               " ORDER BY o.run, o.i"                                                              \
               " ON CONFLICT (run_uuid) DO NOTHING"
const char *const batch_sql_runs_owned[BATCH_SCHEMA_COUNT] = BOTH_SCHEMAS(RUNS_OWNED_SQL);

/*
 * The range's runs MLflow would not write to (SqlAlchemyStore._get_run, _check_run_is_active):
 * unknown, or not active; for a run the range starts, the experiment it names, so that a
 * start in a deleted experiment says so (_check_experiment_is_active). Sent after the runs
 * insert, in the same transaction, so runs started here count. Every write below skips
 * these runs, and the writer rejects their events once the transaction commits.
 */
#define RUN_STATE_SQL(in_ws, ws_column, ws_value)                                                  \
    "SELECT u.run, r.lifecycle_stage, x.experiment_id, x.lifecycle_stage, u.eid"                   \
    " FROM unnest($1::text[], $2::text[], $3::int4[]) AS u(run, exp, eid)"                         \
    " LEFT JOIN runs r ON r.run_uuid = u.run"                                                      \
    " LEFT JOIN experiments x ON (u.eid IS NULL AND x.name = u.exp" in_ws("x") ")"                \
    "  OR x.experiment_id = u.eid"                                                                 \
    " WHERE r.lifecycle_stage IS DISTINCT FROM 'active'"
/* clang-format on */
const char *const batch_sql_run_state[BATCH_SCHEMA_COUNT] = BOTH_SCHEMAS(RUN_STATE_SQL);

const char batch_sql_tags[] =
    "INSERT INTO tags (key, value, run_uuid)"
    " SELECT u.key, u.value, u.run FROM unnest($1::text[], $2::text[], $3::text[])"
    "  AS u(key, value, run) JOIN runs r ON r.run_uuid = u.run AND r.lifecycle_stage = 'active'"
    " ORDER BY 3, 1"
    " ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value";

/* set_tag("mlflow.runName") renames the run too, as update_run_info does. */
const char batch_sql_renames[] =
    "UPDATE runs SET name = t.value FROM unnest($1::text[], $2::text[]) AS t(run, value)"
    " WHERE runs.run_uuid = t.run AND runs.lifecycle_stage = 'active'";

/*
 * Inserts new params and returns, by ord, those whose stored value differs:
 * the CTE's snapshot predates its own insert, so only earlier rows are seen.
 */
const char batch_sql_params[] =
    "WITH i AS (SELECT u.* FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[])"
    "  AS u(key, value, run_uuid, ord)"
    "  JOIN runs r ON r.run_uuid = u.run_uuid AND r.lifecycle_stage = 'active'),"
    " ins AS (INSERT INTO params (key, value, run_uuid)"
    "  SELECT key, value, run_uuid FROM i ORDER BY run_uuid, key"
    "  ON CONFLICT (key, run_uuid) DO NOTHING)"
    " SELECT i.ord, p.value FROM i JOIN params p ON p.key = i.key AND p.run_uuid = i.run_uuid"
    " WHERE p.value <> i.value ORDER BY i.ord";

#define ACTIVE_RUNS                                                                                \
    " run_uuid IN (SELECT run_uuid FROM runs WHERE run_uuid = ANY($1::text[])"                     \
    " AND lifecycle_stage = 'active')"

const char batch_sql_metrics[] =
    "INSERT INTO metrics (key, value, \"timestamp\", run_uuid, step, is_nan)"
    " SELECT key, value, \"timestamp\", run_uuid, step, is_nan FROM trackd_stage_metrics"
    " WHERE" ACTIVE_RUNS " ON CONFLICT DO NOTHING";

/*
 * One row per (run, key), the range's winner (latest_winner: the largest (step, timestamp,
 * value), the earliest arrival among equals), replaces the stored row only if strictly greater,
 * as SqlAlchemyStore._update_latest_metrics_if_necessary.
 */
const char batch_sql_latest[] =
    "INSERT INTO latest_metrics (key, value, \"timestamp\", step, is_nan, run_uuid)"
    " SELECT u.key, u.value, u.ts, u.step, u.is_nan, u.run"
    " FROM unnest($1::text[], $2::float8[], $3::int8[], $4::int8[], $5::bool[], $6::text[])"
    "  AS u(key, value, ts, step, is_nan, run)"
    " WHERE u.run IN (SELECT run_uuid FROM runs WHERE run_uuid = ANY($6::text[])"
    "  AND lifecycle_stage = 'active')"
    " ORDER BY u.run, u.key"
    " ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value,"
    "  \"timestamp\" = EXCLUDED.\"timestamp\", step = EXCLUDED.step, is_nan = EXCLUDED.is_nan"
    " WHERE (EXCLUDED.step, EXCLUDED.\"timestamp\", EXCLUDED.value)"
    "  > (latest_metrics.step, latest_metrics.\"timestamp\", latest_metrics.value)";

/* NULL elements keep the stored value (update_run_info without that field). */
const char batch_sql_end_runs[] =
    "UPDATE runs SET status = COALESCE(t.status, runs.status),"
    " end_time = COALESCE(t.et, runs.end_time)"
    " FROM unnest($1::text[], $2::text[], $3::int8[]) AS t(run, status, et)"
    " WHERE runs.run_uuid = t.run AND runs.lifecycle_stage = 'active'";

const char batch_sql_delete_tags[] =
    "DELETE FROM tags USING unnest($1::text[], $2::text[]) AS t(run, key), runs r"
    " WHERE tags.run_uuid = t.run AND tags.key = t.key"
    "  AND r.run_uuid = t.run AND r.lifecycle_stage = 'active'";

/*
 * Ledger rows take the destination from the run's artifact_uri, in the same transaction
 * order as the run's own insert. A replayed upload meets its row again (DO UPDATE, so it
 * is returned with its status); an unknown run returns no row and the event is rejected.
 */
const char batch_sql_artifacts[] =
    "INSERT INTO trackd_artifacts (upload_id, run_uuid, path, size, sha256, store_uri, status,"
    " created_time)"
    " SELECT u.id, u.run, u.path, u.size, u.sha, rtrim(r.artifact_uri, '/') || '/' || u.path,"
    " 'pending', $6::bigint"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])"
    " AS u(id, run, path, size, sha)"
    " JOIN runs r ON r.run_uuid = u.run AND r.lifecycle_stage = 'active'"
    " ON CONFLICT (upload_id) DO UPDATE SET upload_id = EXCLUDED.upload_id"
    " RETURNING upload_id, store_uri, status";

const char batch_sql_artifacts_done[] =
    "UPDATE trackd_artifacts t SET status = u.status, error = NULLIF(u.err, ''),"
    " finished_time = $4::bigint"
    " FROM unnest($1::text[], $2::text[], $3::text[]) AS u(id, status, err)"
    " WHERE t.upload_id = u.id";

/* ---- array literals ---------------------------------------------------- */

int batch_array_append(struct proto_buf *arr, const char *s, size_t len)
{
    /* Worst case every byte is escaped, plus separator and quotes. */
    if (proto_buf_reserve(arr, 2 * len + 4) != 0)
        return -ENOMEM;
    uint8_t *p = arr->data + arr->len;
    *p++ = arr->len == 0 ? '{' : ',';
    *p++ = '"';
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '"' || s[i] == '\\')
            *p++ = '\\';
        *p++ = (uint8_t)s[i];
    }
    *p++ = '"';
    arr->len = (size_t)(p - arr->data);
    return 0;
}

int batch_array_append_null(struct proto_buf *arr)
{
    if (proto_buf_reserve(arr, 5) != 0)
        return -ENOMEM;
    uint8_t sep = arr->len == 0 ? '{' : ',';
    arr->data[arr->len++] = sep;
    memcpy(arr->data + arr->len, "NULL", 4);
    arr->len += 4;
    return 0;
}

int batch_array_finish(struct proto_buf *arr)
{
    if (proto_buf_reserve(arr, 3) != 0)
        return -ENOMEM;
    if (arr->len == 0)
        arr->data[arr->len++] = '{';
    arr->data[arr->len++] = '}';
    arr->data[arr->len] = '\0';
    return 0;
}

static int array_int(struct proto_buf *arr, int64_t v)
{
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%" PRId64, v);
    return batch_array_append(arr, tmp, (size_t)n);
}

/* A float8 element: 17 significant digits read back as the same double. */
static int array_double(struct proto_buf *arr, double v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%.17g", v);
    return batch_array_append(arr, tmp, (size_t)n);
}

/* A trackd_run_owners row for a start: the run, the uid, the shared gids as an int8[] literal. */
static int append_owner(struct batch_sql *s, const char *run_id, const struct peer *p)
{
    char gids[PEER_SHARED_MAX * 11 + 3];
    size_t n = 0;
    gids[n++] = '{';
    for (int i = 0; i < p->nshared; i++)
        n += (size_t)snprintf(gids + n, sizeof gids - n, "%s%" PRIu32, i ? "," : "", p->shared[i]);
    gids[n++] = '}';
    if (batch_array_append(&s->own_runs, run_id, PROTO_RUN_ID_LEN) ||
        array_int(&s->own_uids, p->uid) || batch_array_append(&s->own_gids, gids, n))
        return -ENOMEM;
    s->n_owns++;
    return 0;
}

/* ---- binary COPY -------------------------------------------------------- */

static int copy_header(struct proto_buf *c)
{
    static const uint8_t sig[19] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', 0xff, '\r', '\n', 0};
    if (proto_buf_reserve(c, sizeof sig) != 0)
        return -ENOMEM;
    memcpy(c->data + c->len, sig, sizeof sig); /* signature, flags 0, extension 0 */
    c->len += sizeof sig;
    return 0;
}

/* One row of BATCH_METRIC_COLUMNS: key, value, timestamp, run_uuid, step, is_nan. */
static int copy_row(struct proto_buf *c, const struct batch *b, const struct ev *ev)
{
    size_t need = 2 + (4 + ev->kv.key.len) + 12 + 12 + (4 + PROTO_RUN_ID_LEN) + 12 + 5;
    if (proto_buf_reserve(c, need) != 0)
        return -ENOMEM;
    uint8_t *p = c->data + c->len;
    uint64_t bits;
    util_put_be16(p, 6), p += 2;
    util_put_be32(p, ev->kv.key.len), p += 4;
    memcpy(p, batch_sptr(b, ev->kv.key), ev->kv.key.len), p += ev->kv.key.len;
    memcpy(&bits, &ev->point.value, sizeof bits);
    util_put_be32(p, 8), util_put_be64(p + 4, bits), p += 12;
    util_put_be32(p, 8), util_put_be64(p + 4, (uint64_t)ev->point.ts), p += 12;
    util_put_be32(p, PROTO_RUN_ID_LEN), p += 4;
    memcpy(p, ev_run(b, ev), PROTO_RUN_ID_LEN), p += PROTO_RUN_ID_LEN;
    util_put_be32(p, 8), util_put_be64(p + 4, (uint64_t)ev->point.step), p += 12;
    util_put_be32(p, 1), p[4] = ev->is_nan ? 1 : 0, p += 5;
    c->len = (size_t)(p - c->data);
    return 0;
}

static int copy_trailer(struct proto_buf *c)
{
    if (proto_buf_reserve(c, 2) != 0)
        return -ENOMEM;
    util_put_be16(c->data + c->len, 0xffff);
    c->len += 2;
    return 0;
}

/* ---- de-duplication within a range ------------------------------------- */

/* Open addressing over event indexes, keyed by (run, key string). */
struct dedup {
    size_t *slot; /* event index + 1; 0 = empty */
    size_t mask;
};

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const uint8_t *s = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 0x100000001b3ull; /* FNV-1a */
    return h;
}

static int dedup_init(struct dedup *d, size_t n)
{
    size_t cap = 16;
    while (cap < n * 2)
        cap *= 2;
    d->slot = calloc(cap, sizeof *d->slot);
    d->mask = cap - 1;
    return d->slot ? 0 : -ENOMEM;
}

/* BY_POINT: a metrics row's primary key (run, key, timestamp, step, value, is_nan). */
enum dedup_by { BY_NAME, BY_RUN, BY_RUN_KEY, BY_POINT };

/* A point's value as its key compares it: float8 equality, so -0 is 0 (NaN is stored as 0). */
static uint64_t point_value_bits(const struct ev *ev)
{
    double v = ev->point.value == 0 ? 0.0 : ev->point.value;
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits;
}

static bool same_identity(const struct batch *b, const struct ev *x, const struct ev *y,
                          enum dedup_by by)
{
    if (by != BY_NAME && memcmp(ev_run(b, x), ev_run(b, y), PROTO_RUN_ID_LEN) != 0)
        return false;
    if (by == BY_RUN)
        return true;
    if (by == BY_POINT && (x->point.ts != y->point.ts || x->point.step != y->point.step ||
                           x->is_nan != y->is_nan || point_value_bits(x) != point_value_bits(y)))
        return false;
    /* The name: an experiment's or a start's experiment, a key otherwise (str[0] of each). */
    return x->str[0].len == y->str[0].len &&
           memcmp(batch_sptr(b, x->str[0]), batch_sptr(b, y->str[0]), x->str[0].len) == 0;
}

/*
 * Returns the slot for event i's identity: *found is the earlier event index
 * with the same identity, or SIZE_MAX when i is the first. A table is only
 * ever used with one `by`, so stored events are comparable.
 */
static size_t *dedup_find(struct dedup *d, const struct batch *b, size_t i, enum dedup_by by,
                          size_t *found)
{
    const struct ev *ev = &b->evs[i];
    uint64_t h = 0xcbf29ce484222325ull;
    if (by != BY_NAME)
        h = hash_bytes(h, ev_run(b, ev), PROTO_RUN_ID_LEN);
    if (by != BY_RUN)
        h = hash_bytes(h, batch_sptr(b, ev->str[0]), ev->str[0].len);
    if (by == BY_POINT) {
        uint64_t v[3] = {(uint64_t)ev->point.ts, (uint64_t)ev->point.step, point_value_bits(ev)};
        h = hash_bytes(h, v, sizeof v);
    }
    for (size_t pos = h & d->mask;; pos = (pos + 1) & d->mask) {
        if (d->slot[pos] == 0) {
            *found = SIZE_MAX;
            return &d->slot[pos];
        }
        size_t j = d->slot[pos] - 1;
        if (same_identity(b, &b->evs[j], ev, by)) {
            *found = j;
            return &d->slot[pos];
        }
    }
}

/* ---- building ------------------------------------------------------------ */

#define SQL_BUFS(s)                                                                                \
    &(s)->exp_names, &(s)->exp_locations, &(s)->del_runs, &(s)->del_keys, &(s)->run_ids,           \
        &(s)->run_names, &(s)->run_users, &(s)->run_starts, &(s)->run_exps, &(s)->tag_keys,        \
        &(s)->tag_values, &(s)->tag_runs, &(s)->rename_runs, &(s)->rename_values,                  \
        &(s)->param_keys, &(s)->param_values, &(s)->param_runs, &(s)->param_ords, &(s)->end_runs,  \
        &(s)->end_statuses, &(s)->end_times, &(s)->art_ids, &(s)->art_runs, &(s)->art_paths,       \
        &(s)->art_sizes, &(s)->art_shas, &(s)->done_ids, &(s)->done_statuses, &(s)->done_errors,   \
        &(s)->state_runs, &(s)->state_exps, &(s)->state_exp_ids, &(s)->run_exp_ids,                \
        &(s)->own_runs, &(s)->own_uids, &(s)->own_gids, &(s)->latest_keys, &(s)->latest_values,    \
        &(s)->latest_ts, &(s)->latest_steps, &(s)->latest_nans, &(s)->latest_runs, &(s)->copy

void batch_sql_init(struct batch_sql *s)
{
    memset(s, 0, sizeof *s);
    struct proto_buf *bufs[] = {SQL_BUFS(s)};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        proto_buf_init(bufs[i], SIZE_MAX / 4);
}

void batch_sql_free(struct batch_sql *s)
{
    struct proto_buf *bufs[] = {SQL_BUFS(s)};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        proto_buf_free(bufs[i]);
    free(s->rejected);
    batch_sql_init(s);
}

/* Empties s for the next range, keeping its buffers' memory: a writer builds one range after
 * another of about the same size. */
static void batch_sql_reset(struct batch_sql *s)
{
    struct proto_buf *bufs[] = {SQL_BUFS(s)};
    struct proto_buf keep[sizeof bufs / sizeof bufs[0]];
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        keep[i] = *bufs[i];
        keep[i].len = 0;
    }
    free(s->rejected);
    memset(s, 0, sizeof *s);
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        *bufs[i] = keep[i];
}

static int reject(struct batch_sql *s, struct batch *b, size_t i)
{
    size_t *r = realloc(s->rejected, (s->n_rejected + 1) * sizeof *r);
    if (r == NULL)
        return -ENOMEM;
    s->rejected = r;
    s->rejected[s->n_rejected++] = i;
    b->evs[i].flags |= EV_REJECTED;
    return 0;
}

#define RUN_NAME_TAG "mlflow.runName"

static bool is_run_name_tag(const struct batch *b, const struct ev *ev)
{
    return ev->kv.key.len == sizeof RUN_NAME_TAG - 1 &&
           memcmp(batch_sptr(b, ev->kv.key), RUN_NAME_TAG, ev->kv.key.len) == 0;
}

/* Appends the batch string r as one element of a text array literal. */
static int append_sref(struct proto_buf *arr, const struct batch *b, struct sref r)
{
    return batch_array_append(arr, batch_sptr(b, r), r.len);
}

static int append_run(struct proto_buf *arr, const struct batch *b, const struct ev *ev)
{
    return batch_array_append(arr, ev_run(b, ev), PROTO_RUN_ID_LEN);
}

/* An experiment id + 1 as an array element: 0 (by name) is NULL. */
static int append_exp_id(struct proto_buf *arr, int64_t id_plus_1)
{
    return id_plus_1 > 0 ? array_int(arr, id_plus_1 - 1) : batch_array_append_null(arr);
}

/* One batch_sql_build call: its range, and what the first pass found. */
struct build {
    struct batch *b;
    struct batch_sql *s;
    size_t lo;
    unsigned tag_value_max;
    struct dedup tags, params, ends, exps, runs, latest, points;
    size_t *tag_win, *end_win; /* by i - lo: 1 when event i is the last of its identity */
    size_t *latest_pos;        /* latest's slot of each (run, key), in order of first point */
    size_t n_latest_pos;
};

/* Pass 1: which tag and end_run events win (the last per identity); a later end_run takes
 * the fields it keeps from the one it replaces. */
static void find_winners(struct build *bd, size_t hi)
{
    struct batch *b = bd->b;
    for (size_t i = bd->lo; i < hi; i++) {
        struct ev *ev = &b->evs[i];
        size_t prev, *slot, k = i - bd->lo;
        bd->tag_win[k] = bd->end_win[k] = 0;
        if (ev->flags & EV_REJECTED)
            continue;
        if (ev->kind == EV_TAG || ev->kind == EV_DELETE_TAG) {
            /* Set and delete of one tag: the last one in the range decides. */
            slot = dedup_find(&bd->tags, b, i, BY_RUN_KEY, &prev);
            if (prev != SIZE_MAX)
                bd->tag_win[prev - bd->lo] = 0;
            *slot = i + 1;
            bd->tag_win[k] = 1;
        } else if (ev->kind == EV_END_RUN) {
            slot = dedup_find(&bd->ends, b, i, BY_RUN, &prev);
            if (prev != SIZE_MAX) {
                const struct ev *p = &b->evs[prev];
                if ((ev->flags & EV_KEEP_STATUS) && !(p->flags & EV_KEEP_STATUS)) {
                    ev->status = p->status;
                    ev->flags &= (uint8_t)~EV_KEEP_STATUS;
                }
                if ((ev->flags & EV_KEEP_END) && !(p->flags & EV_KEEP_END)) {
                    ev->end_ms = p->end_ms;
                    ev->flags &= (uint8_t)~EV_KEEP_END;
                }
                bd->end_win[prev - bd->lo] = 0;
            }
            *slot = i + 1;
            bd->end_win[k] = 1;
        }
    }
}

/* The run state check's input: every run the range names, once, with the experiment a start
 * names. */
static int emit_run_state(struct build *bd, size_t i)
{
    const struct ev *ev = &bd->b->evs[i];
    struct batch_sql *s = bd->s;
    size_t prev, *slot = dedup_find(&bd->runs, bd->b, i, BY_RUN, &prev);
    if (prev != SIZE_MAX)
        return 0;
    *slot = i + 1;
    bool start = ev->kind == EV_START_RUN;
    if (append_run(&s->state_runs, bd->b, ev) ||
        (start ? append_sref(&s->state_exps, bd->b, ev->run.experiment)
               : batch_array_append_null(&s->state_exps)) ||
        append_exp_id(&s->state_exp_ids, start ? ev->start.experiment_id : 0))
        return -ENOMEM;
    s->n_state_runs++;
    return 0;
}

/* An experiment by name (once per range), and a run's start. */
static int emit_start(struct build *bd, size_t i)
{
    struct batch *b = bd->b;
    const struct ev *ev = &b->evs[i];
    struct batch_sql *s = bd->s;
    bool is_start = ev->kind == EV_START_RUN;
    /* A run started by experiment id creates no experiment, as MLflow's create_run. */
    bool by_name = !is_start || ev->start.experiment_id == 0;
    size_t prev, *slot = by_name ? dedup_find(&bd->exps, b, i, BY_NAME, &prev) : NULL;
    if (by_name && prev == SIZE_MAX) {
        *slot = i + 1;
        struct sref name = is_start ? ev->run.experiment : ev->experiment.name;
        struct sref loc = is_start ? (struct sref){0, 0} : ev->experiment.location;
        if (append_sref(&s->exp_names, b, name) || append_sref(&s->exp_locations, b, loc))
            return -ENOMEM;
        s->n_exps++;
    }
    if (!is_start)
        return 0;
    if (append_run(&s->run_ids, bd->b, ev) || append_sref(&s->run_names, b, ev->run.name) ||
        append_sref(&s->run_users, b, ev->run.user) || array_int(&s->run_starts, ev->start.ms) ||
        append_sref(&s->run_exps, b, ev->run.experiment) ||
        append_exp_id(&s->run_exp_ids, ev->start.experiment_id))
        return -ENOMEM;
    s->n_runs++;
    const struct batch_peer *who = batch_ev_peer(b, ev);
    return who ? append_owner(s, ev_run(b, ev), &who->id) : 0;
}

/* The winning set of a tag; mlflow.runName renames the run too. Values are cut to the
 * database's tags.value. */
static int emit_tag(struct build *bd, size_t i)
{
    const struct ev *ev = &bd->b->evs[i];
    struct batch_sql *s = bd->s;
    const char *v = batch_sptr(bd->b, ev->kv.value);
    size_t vlen = validate_utf8_prefix(v, ev->kv.value.len, bd->tag_value_max);
    if (append_sref(&s->tag_keys, bd->b, ev->kv.key) ||
        batch_array_append(&s->tag_values, v, vlen) || append_run(&s->tag_runs, bd->b, ev))
        return -ENOMEM;
    s->n_tags++;
    if (!is_run_name_tag(bd->b, ev))
        return 0;
    if (append_run(&s->rename_runs, bd->b, ev) || batch_array_append(&s->rename_values, v, vlen))
        return -ENOMEM;
    s->n_renames++;
    return 0;
}

/* A param once per run and key: the same value again is a no-op, as in MLflow; another value
 * is rejected. */
static int emit_param(struct build *bd, size_t i)
{
    struct batch *b = bd->b;
    const struct ev *ev = &b->evs[i];
    struct batch_sql *s = bd->s;
    size_t prev, *slot = dedup_find(&bd->params, b, i, BY_RUN_KEY, &prev);
    if (prev != SIZE_MAX) {
        const struct sref x = b->evs[prev].kv.value, y = ev->kv.value;
        bool same = x.len == y.len && memcmp(batch_sptr(b, x), batch_sptr(b, y), y.len) == 0;
        return same ? 0 : reject(s, b, i);
    }
    *slot = i + 1;
    if (append_sref(&s->param_keys, b, ev->kv.key) ||
        append_sref(&s->param_values, b, ev->kv.value) || append_run(&s->param_runs, bd->b, ev) ||
        array_int(&s->param_ords, (int64_t)i))
        return -ENOMEM;
    s->n_params++;
    return 0;
}

static int emit_end(struct build *bd, const struct ev *ev)
{
    struct batch_sql *s = bd->s;
    const char *st = run_status_name(ev->status);
    if (append_run(&s->end_runs, bd->b, ev) ||
        ((ev->flags & EV_KEEP_STATUS) ? batch_array_append_null(&s->end_statuses)
                                      : batch_array_append(&s->end_statuses, st, strlen(st))) ||
        ((ev->flags & EV_KEEP_END) ? batch_array_append_null(&s->end_times)
                                   : array_int(&s->end_times, ev->end_ms)))
        return -ENOMEM;
    s->n_ends++;
    return 0;
}

static int emit_artifact(struct build *bd, const struct ev *ev)
{
    struct batch_sql *s = bd->s;
    const struct batch *b = bd->b;
    if (ev->kind == EV_ARTIFACT_DONE) {
        if (append_sref(&s->done_ids, b, ev->done.upload_id) ||
            append_sref(&s->done_statuses, b, ev->done.status) ||
            append_sref(&s->done_errors, b, ev->done.error))
            return -ENOMEM;
        s->n_dones++;
        return 0;
    }
    if (append_sref(&s->art_ids, b, ev->artifact.upload_id) ||
        append_run(&s->art_runs, bd->b, ev) || append_sref(&s->art_paths, b, ev->artifact.path) ||
        array_int(&s->art_sizes, (int64_t)ev->size) ||
        append_sref(&s->art_shas, b, ev->artifact.sha256))
        return -ENOMEM;
    s->n_arts++;
    return 0;
}

/*
 * MLflow's order for latest_metrics (SqlAlchemyStore._update_latest_metrics_if_necessary):
 * true when x is strictly greater than y by (step, timestamp, value), values as stored.
 */
static bool latest_greater(const struct ev *x, const struct ev *y)
{
    if (x->point.step != y->point.step)
        return x->point.step > y->point.step;
    if (x->point.ts != y->point.ts)
        return x->point.ts > y->point.ts;
    return x->point.value > y->point.value;
}

/*
 * A metric point: the COPY row, and the winner of its (run, key) so far. The same point again
 * in the range (the whole primary key equal) is left out, as ON CONFLICT DO NOTHING would
 * leave it: the stream never conflicts with itself, so it may go straight into metrics.
 */
static int emit_metric(struct build *bd, size_t i)
{
    struct batch *b = bd->b;
    const struct ev *ev = &b->evs[i];
    struct batch_sql *s = bd->s;
    size_t prev, *slot = dedup_find(&bd->points, b, i, BY_POINT, &prev);
    if (prev != SIZE_MAX)
        return 0; /* equal: it cannot win latest_metrics either */
    *slot = i + 1;
    if (s->n_metrics == 0 && copy_header(&s->copy))
        return -ENOMEM;
    if (copy_row(&s->copy, b, ev))
        return -ENOMEM;
    s->n_metrics++;
    slot = dedup_find(&bd->latest, b, i, BY_RUN_KEY, &prev);
    if (prev == SIZE_MAX)
        bd->latest_pos[bd->n_latest_pos++] = (size_t)(slot - bd->latest.slot);
    if (prev == SIZE_MAX || latest_greater(ev, &b->evs[prev]))
        *slot = i + 1; /* among equals the first one stays */
    return 0;
}

/* The winners emit_metric left in the table, one per (run, key), in the order of each one's first
 * point (the statement sorts them). */
static int emit_latest(struct build *bd)
{
    struct batch *b = bd->b;
    struct batch_sql *s = bd->s;
    for (size_t k = 0; k < bd->n_latest_pos; k++) {
        const struct ev *ev = &b->evs[bd->latest.slot[bd->latest_pos[k]] - 1];
        if (append_sref(&s->latest_keys, b, ev->kv.key) ||
            array_double(&s->latest_values, ev->point.value) ||
            array_int(&s->latest_ts, ev->point.ts) || array_int(&s->latest_steps, ev->point.step) ||
            batch_array_append(&s->latest_nans, ev->is_nan ? "t" : "f", 1) ||
            append_run(&s->latest_runs, bd->b, ev))
            return -ENOMEM;
        s->n_latest++;
    }
    return 0;
}

/* Pass 2: one event's statement inputs, in arrival order. */
static int emit(struct build *bd, size_t i)
{
    const struct ev *ev = &bd->b->evs[i];
    struct batch_sql *s = bd->s;
    size_t k = i - bd->lo;
    if (ev->kind != EV_EXPERIMENT && ev->kind != EV_ARTIFACT_DONE && emit_run_state(bd, i))
        return -ENOMEM;
    switch (ev->kind) {
    case EV_EXPERIMENT:
    case EV_START_RUN: return emit_start(bd, i);
    case EV_TAG: return bd->tag_win[k] ? emit_tag(bd, i) : 0;
    case EV_PARAM: return emit_param(bd, i);
    case EV_METRIC: return emit_metric(bd, i);
    case EV_END_RUN: return bd->end_win[k] ? emit_end(bd, ev) : 0;
    case EV_DELETE_TAG:
        if (!bd->tag_win[k])
            return 0;
        if (append_run(&s->del_runs, bd->b, ev) || append_sref(&s->del_keys, bd->b, ev->kv.key))
            return -ENOMEM;
        s->n_dels++;
        return 0;
    case EV_ARTIFACT:
    case EV_ARTIFACT_DONE: return emit_artifact(bd, ev);
    }
    return 0;
}

int batch_sql_build(struct batch *b, size_t lo, size_t hi, unsigned tag_value_max,
                    struct batch_sql *s)
{
    struct build bd = {.b = b, .s = s, .lo = lo, .tag_value_max = tag_value_max};
    int rc = -ENOMEM;
    batch_sql_reset(s);
    size_t n = hi - lo;
    if (dedup_init(&bd.tags, n) || dedup_init(&bd.params, n) || dedup_init(&bd.ends, n) ||
        dedup_init(&bd.exps, n) || dedup_init(&bd.runs, n) || dedup_init(&bd.latest, n) ||
        dedup_init(&bd.points, n))
        goto out;
    bd.tag_win = malloc((n + 1) * sizeof *bd.tag_win);
    bd.end_win = malloc((n + 1) * sizeof *bd.end_win);
    bd.latest_pos = malloc((n + 1) * sizeof *bd.latest_pos);
    if (bd.tag_win == NULL || bd.end_win == NULL || bd.latest_pos == NULL)
        goto out;
    find_winners(&bd, hi);
    for (size_t i = lo; i < hi; i++)
        if (!(b->evs[i].flags & EV_REJECTED) && emit(&bd, i) != 0)
            goto out;
    if (s->n_metrics && (copy_trailer(&s->copy) || emit_latest(&bd)))
        goto out;
    struct proto_buf *arrays[] = {SQL_BUFS(s)};
    /* Every buffer but the COPY stream is a text array literal. */
    for (size_t k = 0; k + 1 < sizeof arrays / sizeof arrays[0]; k++)
        if (batch_array_finish(arrays[k]))
            goto out;
    rc = 0;
out:
    free(bd.tags.slot);
    free(bd.params.slot);
    free(bd.ends.slot);
    free(bd.exps.slot);
    free(bd.runs.slot);
    free(bd.latest.slot);
    free(bd.points.slot);
    free(bd.tag_win);
    free(bd.end_win);
    free(bd.latest_pos);
    return rc;
}
