/*
 * Connection parameters, SQLSTATE classes and the schema check. MLflow owns the DDL: trackd
 * only reads alembic_version, information_schema and pg_index here, accepts a database by the
 * structure of the tables it writes (every column with a usable type, every unique key its
 * statements rely on), and names what does not fit rather than writing rows MLflow might read
 * differently.
 */
#include "pgconn.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "stats.h"
#include "validate.h"

/* The releases tests/integration/test_compat.py and the differential tests run against. */
const char *const pgconn_tested_revisions[] = {
    "dc11669786a5", /* MLflow 3.17.x */
    "1b5f0d9ad7c1", /* MLflow 3.10.x, the first with experiment workspaces */
    "0584bdc529eb", /* MLflow 2.22.x */
    "f5a4f2784254", /* MLflow 2.17.x */
    "acf3f17fdcc7", /* MLflow 2.10.x, the oldest trackd writes: tags.value varchar(5000) */
    NULL,
};

/*
 * Every column the writer names, with the types its statements need (information_schema's
 * data_type; "|" separates the ones that do) and, for a character varying, the length the
 * values trackd admits need (validate.h; 0: whatever the column holds). MLflow 2.10 to 3.17
 * agree on all of them but two: experiments.workspace, which 3.10 added (revision
 * 1b5f0d9ad7c1) and which is optional here, and tags.value, varchar(5000) before 2.17
 * (revision f5a4f2784254 made it 8000): the writer cuts tag values to the column's length, as
 * MLflow 2.16 cuts them to its MAX_TAG_VAL_LENGTH of 5000 (2.10 to 2.15 refuse longer ones).
 */
#define STR "character varying|text"
#define KEY VALIDATE_KEY_MAX
static const struct {
    const char *table, *column, *types;
    unsigned min_len;
} required_columns[] = {
    {"experiments", "experiment_id", "integer|bigint", 0},
    {"experiments", "name", STR, VALIDATE_EXPERIMENT_NAME_MAX},
    {"experiments", "artifact_location", STR, 0},
    {"experiments", "lifecycle_stage", STR, 0},
    {"experiments", "creation_time", "bigint", 0},
    {"experiments", "last_update_time", "bigint", 0},
    {"runs", "run_uuid", STR, VALIDATE_RUN_ID_LEN},
    {"runs", "name", STR, VALIDATE_RUN_NAME_MAX},
    {"runs", "source_type", STR, 0},
    {"runs", "source_name", STR, 0},
    {"runs", "entry_point_name", STR, 0},
    {"runs", "user_id", STR, 0},
    {"runs", "status", STR, 0},
    {"runs", "start_time", "bigint", 0},
    {"runs", "end_time", "bigint", 0},
    {"runs", "source_version", STR, 0},
    {"runs", "lifecycle_stage", STR, 0},
    {"runs", "artifact_uri", STR, 0},
    {"runs", "experiment_id", "integer|bigint", 0},
    {"runs", "deleted_time", "bigint", 0},
    {"tags", "key", STR, KEY},
    {"tags", "value", STR, PGCONN_TAG_VALUE_MIN},
    {"tags", "run_uuid", STR, VALIDATE_RUN_ID_LEN},
    {"params", "key", STR, KEY},
    {"params", "value", STR, VALIDATE_PARAM_VALUE_MAX},
    {"params", "run_uuid", STR, VALIDATE_RUN_ID_LEN},
    {"metrics", "key", STR, KEY},
    {"metrics", "value", "double precision", 0},
    {"metrics", "timestamp", "bigint", 0},
    {"metrics", "run_uuid", STR, VALIDATE_RUN_ID_LEN},
    {"metrics", "step", "bigint", 0},
    {"metrics", "is_nan", "boolean", 0},
    {"latest_metrics", "key", STR, KEY},
    {"latest_metrics", "value", "double precision", 0},
    {"latest_metrics", "timestamp", "bigint", 0},
    {"latest_metrics", "step", "bigint", 0},
    {"latest_metrics", "is_nan", "boolean", 0},
    {"latest_metrics", "run_uuid", STR, VALIDATE_RUN_ID_LEN},
};
#undef KEY
#undef STR

/*
 * The unique keys the statements' ON CONFLICT clauses and de-duplication rely on (columns in
 * alphabetical order, as the check query lists them). experiments needs one of two, by the
 * presence of experiments.workspace.
 */
static const struct {
    const char *table, *columns, *used_for;
} required_keys[] = {
    {"runs", "run_uuid", "ON CONFLICT (run_uuid)"},
    {"tags", "key,run_uuid", "ON CONFLICT (key, run_uuid)"},
    {"params", "key,run_uuid", "ON CONFLICT (key, run_uuid)"},
    {"latest_metrics", "key,run_uuid", "ON CONFLICT (key, run_uuid)"},
    {"metrics", "is_nan,key,run_uuid,step,timestamp,value", "de-duplicating metric points"},
};

int pgconn_dsn_check(const char *dsn, char *msg, size_t msglen)
{
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(dsn, &err);
    if (opts == NULL) {
        /* Keep libpq's words, drop what it quotes from the string (but a quoted "="). */
        size_t o = 0;
        bool quoted = false;
        const char *e = err ? err : "out of memory";
        for (const char *q = e; *q && o + 4 < msglen; q++) {
            if (*q == '"') {
                if (!quoted && q[1] == '=' && q[2] == '"') {
                    memcpy(msg + o, "\"=\"", 3);
                    o += 3;
                    q += 2;
                    continue;
                }
                if (!quoted) {
                    memcpy(msg + o, "\"...\"", 5);
                    o += 5;
                }
                quoted = !quoted;
            } else if (!quoted && *q != '\n') {
                msg[o++] = *q;
            }
        }
        msg[o] = '\0';
        PQfreemem(err);
        return -EINVAL;
    }
    for (PQconninfoOption *opt = opts; opt->keyword; opt++)
        if (strcmp(opt->keyword, "password") == 0 && opt->val)
            log_add_secret(opt->val);
    PQconninfoFree(opts);
    struct pgconn_targets t;
    int rc = pgconn_targets_parse(dsn, &t, msg, msglen);
    pgconn_targets_free(&t);
    return rc;
}

int pgconn_params_init(struct pgconn_params *p, const struct trackd_config *cfg, char *msg,
                       size_t msglen)
{
    size_t n = 0;
    memset(p, 0, sizeof *p);
    /* First, so that a connect_timeout in the DSN wins; libpq's minimum is 2 s. */
    unsigned secs = (cfg->pg_connect_timeout_ms + 999) / 1000;
    snprintf(p->timeout, sizeof p->timeout, "%u", secs < 2 ? 2 : secs);
    p->keys[n] = "connect_timeout";
    p->values[n++] = p->timeout;
    p->keys[n] = "dbname";
    p->values[n++] = cfg->pg_dsn;
    p->keys[n] = "fallback_application_name";
    p->values[n++] = "trackd";
    if (cfg->pg_password_file && cfg->pg_password_file[0]) {
        FILE *f = fopen(cfg->pg_password_file, "r");
        if (f == NULL) {
            int e = errno;
            snprintf(msg, msglen, "cannot read [postgres] password_file %s: %s",
                     cfg->pg_password_file, strerror(e));
            return -e;
        }
        if (fgets(p->password, sizeof p->password, f) == NULL)
            p->password[0] = '\0';
        fclose(f);
        p->password[strcspn(p->password, "\r\n")] = '\0';
        log_add_secret(p->password);
        p->keys[n] = "password";
        p->values[n++] = p->password;
    }
    p->n_base = n;
    p->keys[n] = NULL;
    p->values[n] = NULL;
    return 0;
}

void pgconn_params_target(struct pgconn_params *p, const char *host, const char *hostaddr,
                          const char *port)
{
    size_t n = p->n_base;
    const char *const keys[] = {"host", "hostaddr", "port"};
    const char *const values[] = {host, hostaddr, port};
    for (size_t i = 0; i < 3; i++) {
        if (values[i] == NULL)
            continue;
        p->keys[n] = keys[i];
        p->values[n++] = values[i];
    }
    p->keys[n] = NULL;
    p->values[n] = NULL;
}

int pgconn_host_is_socket(const char *host)
{
    return host && (host[0] == '/' || host[0] == '@');
}

static size_t list_count(const char *s)
{
    size_t n = 1;
    for (; *s; s++)
        n += *s == ',';
    return n;
}

/* Returns the next comma-separated entry of *s (split in place), advancing *s. */
static char *list_next(char **s)
{
    char *e = *s, *c = strchr(e, ',');
    if (c) {
        *c = '\0';
        *s = c + 1;
    } else {
        *s = e + strlen(e);
    }
    return e;
}

int pgconn_targets_parse(const char *dsn, struct pgconn_targets *t, char *msg, size_t msglen)
{
    memset(t, 0, sizeof *t);
    PQconninfoOption *opts = PQconninfoParse(dsn, NULL);
    if (opts == NULL) {
        snprintf(msg, msglen, "libpq cannot parse it");
        return -EINVAL;
    }
    const char *host = NULL, *hostaddr = NULL, *port = NULL, *timeout = NULL;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        const char *v = o->val && o->val[0] ? o->val : NULL;
        if (strcmp(o->keyword, "host") == 0)
            host = v;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = v;
        else if (strcmp(o->keyword, "port") == 0)
            port = v;
        else if (strcmp(o->keyword, "connect_timeout") == 0)
            timeout = v;
    }
    int rc = 0;
    if (timeout) {
        /* libpq's rule: whole seconds, 0 or negative means none, and at least 2. */
        long secs = strtol(timeout, NULL, 10);
        if (secs > 0)
            t->timeout_ms = (unsigned)(secs < 2 ? 2 : secs > 600 ? 600 : secs) * 1000u;
    }
    if (host == NULL && hostaddr == NULL)
        goto out;
    size_t nh = host ? list_count(host) : 0, na = hostaddr ? list_count(hostaddr) : 0;
    size_t n = nh > na ? nh : na, np = port ? list_count(port) : 0;
    if ((nh && na && nh != na) || (np > 1 && np != n)) {
        snprintf(msg, msglen,
                 "its %zu host, %zu hostaddr and %zu port entries do not pair up (give one "
                 "port for all hosts, or one per host)",
                 nh, na, np);
        rc = -EINVAL;
        goto out;
    }
    size_t hl = host ? strlen(host) + 1 : 0, al = hostaddr ? strlen(hostaddr) + 1 : 0;
    size_t pl = port ? strlen(port) + 1 : 0;
    t->strings = malloc(hl + al + pl + 1);
    t->v = calloc(n, sizeof *t->v);
    if (t->strings == NULL || t->v == NULL) {
        rc = -ENOMEM;
        snprintf(msg, msglen, "out of memory");
        goto out;
    }
    char *hs = t->strings, *as = hs + hl, *ps = as + al;
    if (host)
        memcpy(hs, host, hl);
    if (hostaddr)
        memcpy(as, hostaddr, al);
    if (port)
        memcpy(ps, port, pl);
    const char *one_port = np == 1 ? ps : NULL;
    for (size_t i = 0; i < n; i++) {
        struct pgconn_target *x = &t->v[i];
        x->host = nh ? list_next(&hs) : NULL;
        x->hostaddr = na ? list_next(&as) : NULL;
        x->port = np > 1 ? list_next(&ps) : one_port;
        if (x->host && x->host[0] == '\0')
            x->host = NULL;
        if (x->hostaddr && x->hostaddr[0] == '\0')
            x->hostaddr = NULL;
        if (x->port && x->port[0] == '\0')
            x->port = NULL;
        if (x->host == NULL && x->hostaddr == NULL) {
            /* An empty entry means libpq's default socket directory, which only libpq knows. */
            free(t->v);
            free(t->strings);
            t->v = NULL;
            t->strings = NULL;
            goto out;
        }
    }
    t->n = n;
out:
    PQconninfoFree(opts);
    if (rc != 0)
        pgconn_targets_free(t);
    return rc;
}

void pgconn_targets_free(struct pgconn_targets *t)
{
    free(t->v);
    free(t->strings);
    memset(t, 0, sizeof *t);
}

void pgconn_params_clear(struct pgconn_params *p)
{
    volatile char *s = p->password;
    for (size_t i = 0; i < sizeof p->password; i++)
        s[i] = 0;
}

enum pgconn_class pgconn_classify(const char *sqlstate)
{
    if (sqlstate && strlen(sqlstate) == 5 &&
        (strncmp(sqlstate, "22", 2) == 0 || strncmp(sqlstate, "23", 2) == 0))
        return PGCONN_ISOLATE;
    return PGCONN_RETRY;
}

const struct pgconn_error_class *pgconn_error_class(const char *sqlstate)
{
    static struct pgconn_error_class classes[] = {
        {"08", "connection exception", "check that PostgreSQL is up and reachable from this node",
         NULL},
        {"25", "invalid transaction state",
         "a read-only server (a standby?) or a pooler's session state: point [postgres] dsn at "
         "the primary",
         NULL},
        {"40", "transaction rollback",
         "a serialization failure or deadlock with another session; look at the other session "
         "if it persists",
         NULL},
        {"42", "syntax error or access rule violation",
         "the MLflow schema or trackd's privileges changed: check the GRANTs on MLflow's "
         "tables and the schema revision",
         NULL},
        {"53", "insufficient resources",
         "PostgreSQL is out of disk, memory or connections (max_connections, the role's "
         "CONNECTION LIMIT): free some",
         NULL},
        {"55", "object not in prerequisite state",
         "another session holds a lock trackd needs (lock_timeout expired): find it in "
         "pg_locks and pg_stat_activity",
         NULL},
        {"57", "operator intervention",
         "a statement_timeout, a cancelled query, a terminated backend or a server shutdown: look "
         "for long lock holders in pg_stat_activity, or raise statement_timeout for trackd's role",
         NULL},
        {"58", "system error", "an I/O error on the database server: check its log and disks",
         NULL},
        {"XX", "internal error", "a server bug or data corruption: check the PostgreSQL server log",
         NULL},
        {"other", "unexpected error", "check the PostgreSQL server log", NULL},
    };
    if (classes[0].counter == NULL) {
        uint64_t *counters[] = {&stats.db_errors_class_08, &stats.db_errors_class_25,
                                &stats.db_errors_class_40, &stats.db_errors_class_42,
                                &stats.db_errors_class_53, &stats.db_errors_class_55,
                                &stats.db_errors_class_57, &stats.db_errors_class_58,
                                &stats.db_errors_class_XX, &stats.db_errors_other};
        for (size_t i = 0; i < sizeof classes / sizeof classes[0]; i++)
            classes[i].counter = counters[i];
    }
    size_t n = sizeof classes / sizeof classes[0];
    if (sqlstate == NULL || sqlstate[0] == '\0')
        return &classes[0];
    for (size_t i = 0; i + 1 < n; i++)
        if (strncmp(sqlstate, classes[i].code, 2) == 0)
            return &classes[i];
    return &classes[n - 1];
}

void pgconn_notice(void *arg, const char *message)
{
    (void)arg;
    log_debug("[postgres] %.*s", (int)strcspn(message, "\n"), message);
}

const char *pgconn_tested_list(void)
{
    static char text[256];
    if (text[0] == '\0') {
        size_t n = 0;
        for (size_t i = 0; pgconn_tested_revisions[i] && n < sizeof text; i++)
            n += (size_t)snprintf(text + n, sizeof text - n, "%s%s", i ? ", " : "",
                                  pgconn_tested_revisions[i]);
    }
    return text;
}

static bool revision_allowed(const struct trackd_config *cfg, const char *rev)
{
    for (size_t i = 0; pgconn_tested_revisions[i]; i++)
        if (strcmp(pgconn_tested_revisions[i], rev) == 0)
            return true;
    const char *list = cfg->allowed_revisions ? cfg->allowed_revisions : "";
    size_t rl = strlen(rev);
    while (*list) {
        list += strspn(list, " ,");
        size_t n = strcspn(list, " ,");
        if (n == rl && strncmp(list, rev, n) == 0)
            return true;
        list += n;
    }
    return false;
}

#define CHECKED_TABLES "('experiments', 'runs', 'tags', 'params', 'metrics', 'latest_metrics')"

const char pgconn_check_sql[] =
    "SELECT version_num FROM alembic_version;"
    "SELECT table_name, column_name, data_type, character_maximum_length"
    " FROM information_schema.columns"
    " WHERE table_schema = current_schema() AND table_name IN " CHECKED_TABLES ";"
    "SELECT t.relname, (SELECT string_agg(a.attname, ',' ORDER BY a.attname) FROM pg_attribute a"
    "  WHERE a.attrelid = t.oid AND a.attnum = ANY (i.indkey))"
    " FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid"
    " WHERE i.indisunique AND i.indpred IS NULL"
    "  AND t.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
    "  AND t.relname IN " CHECKED_TABLES;

/* The row of cols naming table.column, or -1. */
static int find_column(const PGresult *cols, const char *table, const char *column)
{
    for (int row = 0; row < PQntuples(cols); row++)
        if (strcmp(PQgetvalue(cols, row, 0), table) == 0 &&
            strcmp(PQgetvalue(cols, row, 1), column) == 0)
            return row;
    return -1;
}

static bool type_in(const char *type, const char *alternatives)
{
    size_t n = strlen(type);
    for (const char *p = alternatives; *p;) {
        size_t k = strcspn(p, "|");
        if (k == n && strncmp(p, type, n) == 0)
            return true;
        p += k + (p[k] == '|');
    }
    return false;
}

static bool has_key(const PGresult *keys, const char *table, const char *columns)
{
    for (int row = 0; row < PQntuples(keys); row++)
        if (strcmp(PQgetvalue(keys, row, 0), table) == 0 &&
            strcmp(PQgetvalue(keys, row, 1), columns) == 0)
            return true;
    return false;
}

static bool result_ok(const PGresult *r, const char *what, char *msg, size_t msglen)
{
    if (r != NULL && PQresultStatus(r) == PGRES_TUPLES_OK)
        return true;
    snprintf(msg, msglen, "cannot read %s: %.*s", what,
             r ? (int)strcspn(PQresultErrorMessage(r), "\n") : 9,
             r ? PQresultErrorMessage(r) : "no result");
    return false;
}

int pgconn_check_results(const struct trackd_config *cfg, const char *dbname,
                         PGresult *const res[PGCONN_CHECK_RESULTS], struct pgconn_schema *out,
                         char *msg, size_t msglen)
{
    const PGresult *rev = res[0], *cols = res[1], *keys = res[2];
    memset(out, 0, sizeof *out);
    if (rev == NULL || PQresultStatus(rev) != PGRES_TUPLES_OK) {
        const char *st = rev ? PQresultErrorField(rev, PG_DIAG_SQLSTATE) : NULL;
        if (st && strcmp(st, "42P01") == 0)
            snprintf(msg, msglen,
                     "database %s has no MLflow schema (table alembic_version is missing). "
                     "Initialise it with MLflow once, e.g. `mlflow server --backend-store-uri "
                     "postgresql://...` or `mlflow db upgrade` followed by one start of the "
                     "server; trackd never creates MLflow's tables",
                     dbname);
        else
            snprintf(msg, msglen, "schema check failed: %.*s",
                     rev ? (int)strcspn(PQresultErrorMessage(rev), "\n") : 15,
                     rev ? PQresultErrorMessage(rev) : "no result");
        return -EINVAL;
    }
    if (PQntuples(rev) != 1) {
        snprintf(msg, msglen,
                 "alembic_version must hold exactly one row (found %d); the MLflow schema is "
                 "incomplete: run `mlflow db upgrade` on it",
                 PQntuples(rev));
        return -EINVAL;
    }
    snprintf(out->revision, sizeof out->revision, "%s", PQgetvalue(rev, 0, 0));
    out->tested = revision_allowed(cfg, out->revision);
    if (!result_ok(cols, "information_schema.columns", msg, msglen) ||
        !result_ok(keys, "the unique indexes of MLflow's tables (pg_index)", msg, msglen))
        return -EINVAL;
    const char *advice = out->tested ? "the database does not match its MLflow release; run "
                                       "`mlflow db upgrade` with that release"
                                     : "trackd writes MLflow 2.10 to 3.17 schemas; upgrade the "
                                       "database with a release in that range (`mlflow db "
                                       "upgrade`)";
    for (size_t i = 0; i < sizeof required_columns / sizeof required_columns[0]; i++) {
        int row = find_column(cols, required_columns[i].table, required_columns[i].column);
        if (row < 0) {
            snprintf(msg, msglen,
                     "MLflow schema revision %s does not fit: column %s.%s is missing (%s)",
                     out->revision, required_columns[i].table, required_columns[i].column, advice);
            return -EINVAL;
        }
        const char *type = PQgetvalue(cols, row, 2);
        if (!type_in(type, required_columns[i].types)) {
            snprintf(msg, msglen,
                     "MLflow schema revision %s does not fit: column %s.%s is %s, trackd writes "
                     "it as %s (%s)",
                     out->revision, required_columns[i].table, required_columns[i].column, type,
                     required_columns[i].types, advice);
            return -EINVAL;
        }
        /* NULL for text and for a varchar without a length: no limit. */
        const char *len = PQgetvalue(cols, row, 3);
        unsigned long holds = *len ? strtoul(len, NULL, 10) : ULONG_MAX;
        if (holds < required_columns[i].min_len) {
            snprintf(msg, msglen,
                     "MLflow schema revision %s does not fit: column %s.%s holds at most %lu "
                     "characters, trackd writes up to %u (%s)",
                     out->revision, required_columns[i].table, required_columns[i].column, holds,
                     required_columns[i].min_len, advice);
            return -EINVAL;
        }
        if (strcmp(required_columns[i].table, "tags") == 0 &&
            strcmp(required_columns[i].column, "value") == 0)
            out->tag_value_max =
                holds < VALIDATE_TAG_VALUE_MAX ? (unsigned)holds : VALIDATE_TAG_VALUE_MAX;
    }
    out->workspace = find_column(cols, "experiments", "workspace") >= 0;
    const char *exp_key = out->workspace ? "name,workspace" : "name";
    if (!has_key(keys, "experiments", exp_key)) {
        snprintf(msg, msglen,
                 "MLflow schema revision %s does not fit: experiments has no unique key on (%s), "
                 "which experiment names rely on (%s)",
                 out->revision, exp_key, advice);
        return -EINVAL;
    }
    for (size_t i = 0; i < sizeof required_keys / sizeof required_keys[0]; i++)
        if (!has_key(keys, required_keys[i].table, required_keys[i].columns)) {
            snprintf(msg, msglen,
                     "MLflow schema revision %s does not fit: %s has no unique key on (%s), "
                     "which trackd relies on for %s (%s)",
                     out->revision, required_keys[i].table, required_keys[i].columns,
                     required_keys[i].used_for, advice);
            return -EINVAL;
        }
    return 0;
}

void pgconn_log_schema(const struct pgconn_schema *s)
{
    static char said[sizeof s->revision]; /* loop thread, or start-up before it */
    if (strcmp(said, s->revision) == 0)
        return;
    snprintf(said, sizeof said, "%s", s->revision);
    if (s->tested)
        log_info("[postgres] MLflow schema revision %s", s->revision);
    else
        log_warn("[postgres] MLflow schema revision %s is not one trackd is tested with (tested: "
                 "%s); its tables have every column and key trackd writes, so it is used. Check "
                 "that MLflow shows the first runs as expected; [mlflow] allowed_revisions "
                 "silences this warning",
                 s->revision, pgconn_tested_list());
}

int pgconn_check_schema(const struct trackd_config *cfg, char *msg, size_t msglen)
{
    struct pgconn_params p;
    if (pgconn_params_init(&p, cfg, msg, msglen) != 0)
        return PGCONN_CHECK_FAILED;
    PGconn *c = PQconnectdbParams(p.keys, p.values, 1);
    pgconn_params_clear(&p);
    if (PQstatus(c) != CONNECTION_OK) {
        snprintf(msg, msglen, "cannot connect to PostgreSQL: %.*s",
                 (int)strcspn(PQerrorMessage(c), "\n"), PQerrorMessage(c));
        PQfinish(c);
        return PGCONN_CHECK_UNREACHABLE;
    }
    PQsetNoticeProcessor(c, pgconn_notice, NULL);
    PGresult *res[PGCONN_CHECK_RESULTS] = {NULL}, *r;
    size_t got = 0;
    if (PQsendQuery(c, pgconn_check_sql)) {
        while ((r = PQgetResult(c)) != NULL) {
            if (got < PGCONN_CHECK_RESULTS)
                res[got++] = r;
            else
                PQclear(r);
        }
    }
    int rc = PGCONN_CHECK_FAILED;
    struct pgconn_schema schema;
    if (res[0] == NULL && PQstatus(c) == CONNECTION_BAD) {
        snprintf(msg, msglen, "PostgreSQL connection lost during the schema check: %.*s",
                 (int)strcspn(PQerrorMessage(c), "\n"), PQerrorMessage(c));
        rc = PGCONN_CHECK_UNREACHABLE;
    } else if (pgconn_check_results(cfg, PQdb(c), res, &schema, msg, msglen) == 0) {
        pgconn_log_schema(&schema);
        rc = PGCONN_CHECK_OK;
    }
    for (size_t i = 0; i < PGCONN_CHECK_RESULTS; i++)
        PQclear(res[i]);
    PQfinish(c);
    return rc;
}
