/*
 * Connection parameters, SQLSTATE classes and the start-up schema check.
 * MLflow owns the DDL: trackd only reads alembic_version and
 * information_schema here, and refuses a database it was not tested with
 * rather than writing rows MLflow might read differently.
 */
#include "pgconn.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "stats.h"

const char *const pgconn_tested_revisions[] = {
    "dc11669786a5", /* MLflow 3.17.x */
    NULL,
};

/* Every column the writer names, per table. */
static const char *const required_columns[][2] = {
    {"experiments", "experiment_id"},
    {"experiments", "name"},
    {"experiments", "artifact_location"},
    {"experiments", "lifecycle_stage"},
    {"experiments", "creation_time"},
    {"experiments", "last_update_time"},
    {"experiments", "workspace"},
    {"runs", "run_uuid"},
    {"runs", "name"},
    {"runs", "source_type"},
    {"runs", "source_name"},
    {"runs", "entry_point_name"},
    {"runs", "user_id"},
    {"runs", "status"},
    {"runs", "start_time"},
    {"runs", "end_time"},
    {"runs", "source_version"},
    {"runs", "lifecycle_stage"},
    {"runs", "artifact_uri"},
    {"runs", "experiment_id"},
    {"runs", "deleted_time"},
    {"tags", "key"},
    {"tags", "value"},
    {"tags", "run_uuid"},
    {"params", "key"},
    {"params", "value"},
    {"params", "run_uuid"},
    {"metrics", "key"},
    {"metrics", "value"},
    {"metrics", "timestamp"},
    {"metrics", "run_uuid"},
    {"metrics", "step"},
    {"metrics", "is_nan"},
    {"latest_metrics", "key"},
    {"latest_metrics", "value"},
    {"latest_metrics", "timestamp"},
    {"latest_metrics", "step"},
    {"latest_metrics", "is_nan"},
    {"latest_metrics", "run_uuid"},
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

const char pgconn_check_sql[] =
    "SELECT version_num FROM alembic_version;"
    "SELECT table_name || '.' || column_name FROM information_schema.columns"
    " WHERE table_schema = current_schema()";

int pgconn_check_results(const struct trackd_config *cfg, const char *dbname, const PGresult *rev,
                         const PGresult *cols, char *msg, size_t msglen)
{
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
        return -1;
    }
    if (PQntuples(rev) != 1) {
        snprintf(msg, msglen,
                 "alembic_version must hold exactly one row (found %d); the MLflow schema is "
                 "incomplete: run `mlflow db upgrade` on it",
                 PQntuples(rev));
        return -1;
    }
    const char *version = PQgetvalue(rev, 0, 0);
    if (!revision_allowed(cfg, version)) {
        snprintf(msg, msglen,
                 "MLflow schema revision %s is not one trackd is tested with (tested: %s). "
                 "Upgrade or downgrade the database with the matching MLflow release, or add the "
                 "revision to [mlflow] allowed_revisions after checking it",
                 version, pgconn_tested_revisions[0]);
        return -1;
    }
    if (cols == NULL || PQresultStatus(cols) != PGRES_TUPLES_OK) {
        snprintf(msg, msglen, "cannot read information_schema.columns: %.*s",
                 cols ? (int)strcspn(PQresultErrorMessage(cols), "\n") : 15,
                 cols ? PQresultErrorMessage(cols) : "no result");
        return -1;
    }
    for (size_t i = 0; i < sizeof required_columns / sizeof required_columns[0]; i++) {
        char want[128];
        snprintf(want, sizeof want, "%s.%s", required_columns[i][0], required_columns[i][1]);
        bool found = false;
        for (int row = 0; row < PQntuples(cols) && !found; row++)
            found = strcmp(PQgetvalue(cols, row, 0), want) == 0;
        if (!found) {
            snprintf(msg, msglen,
                     "column %s is missing from the MLflow schema; the database was not "
                     "initialised by a supported MLflow release (run `mlflow db upgrade`)",
                     want);
            return -1;
        }
    }
    return 0;
}

const char *pgconn_check_revision(const PGresult *rev)
{
    return PQntuples(rev) == 1 ? PQgetvalue(rev, 0, 0) : "?";
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
    PGresult *rev = NULL, *cols = NULL, *r;
    if (PQsendQuery(c, pgconn_check_sql)) {
        while ((r = PQgetResult(c)) != NULL) {
            if (rev == NULL)
                rev = r;
            else if (cols == NULL)
                cols = r;
            else
                PQclear(r);
        }
    }
    int rc = PGCONN_CHECK_FAILED;
    if (rev == NULL && PQstatus(c) == CONNECTION_BAD) {
        snprintf(msg, msglen, "PostgreSQL connection lost during the schema check: %.*s",
                 (int)strcspn(PQerrorMessage(c), "\n"), PQerrorMessage(c));
        rc = PGCONN_CHECK_UNREACHABLE;
    } else if (pgconn_check_results(cfg, PQdb(c), rev, cols, msg, msglen) == 0) {
        log_info("[postgres] MLflow schema revision %s", pgconn_check_revision(rev));
        rc = PGCONN_CHECK_OK;
    }
    PQclear(rev);
    PQclear(cols);
    PQfinish(c);
    return rc;
}
