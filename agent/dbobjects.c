/*
 * The ledger and the views, and the tools that read or remove them. The views are plain
 * projections of MLflow's tables under names and columns some tools expect (run_uuid and
 * run_name side by side); PostgreSQL refuses to change the type of a column a view uses,
 * which is why they are optional and `trackd views drop` exists.
 */
#include "dbobjects.h"

#include <libpq-fe.h>
#include <string.h>

#include "config.h"
#include "pgconn.h"

const char dbobjects_ledger_sql[] =
    "CREATE TABLE IF NOT EXISTS trackd_artifacts ("
    " upload_id text PRIMARY KEY,"
    " run_uuid varchar(32) NOT NULL,"
    " path text NOT NULL,"
    " size bigint NOT NULL,"
    " sha256 char(64) NOT NULL,"
    " store_uri text NOT NULL,"
    " status text NOT NULL CHECK (status IN ('pending', 'done', 'failed')),"
    " error text,"
    " created_time bigint NOT NULL,"
    " finished_time bigint);"
    "CREATE INDEX IF NOT EXISTS trackd_artifacts_run ON trackd_artifacts (run_uuid)";

const char dbobjects_run_owners_table_sql[] = "CREATE TABLE IF NOT EXISTS trackd_run_owners ("
                                              " run_uuid varchar(32) PRIMARY KEY,"
                                              " uid bigint NOT NULL,"
                                              " shared_gids bigint[] NOT NULL,"
                                              " created_time bigint NOT NULL)";

const char dbobjects_run_owners_sql[] =
    "SELECT r.run_uuid, o.uid, o.shared_gids, r.user_id FROM runs r"
    " LEFT JOIN trackd_run_owners o ON o.run_uuid = r.run_uuid"
    " WHERE r.run_uuid = ANY($1::text[])";

const char dbobjects_run_users_sql[] =
    "SELECT r.run_uuid, NULL::bigint, NULL::text, r.user_id FROM runs r"
    " WHERE r.run_uuid = ANY($1::text[])";

const char dbobjects_progress_table_sql[] = "CREATE TABLE IF NOT EXISTS trackd_journal_progress ("
                                            " journal_id text PRIMARY KEY,"
                                            " lsn bigint NOT NULL,"
                                            " events bigint NOT NULL,"
                                            " updated_time bigint NOT NULL)";

const char dbobjects_progress_sql[] =
    "INSERT INTO trackd_journal_progress (journal_id, lsn, events, updated_time)"
    " VALUES ($1, $2::bigint, $3::bigint, $4::bigint) ON CONFLICT (journal_id) DO UPDATE"
    " SET lsn = EXCLUDED.lsn, events = EXCLUDED.events, updated_time = EXCLUDED.updated_time";

const char dbobjects_views_sql[] =
    "CREATE OR REPLACE VIEW mlflow_runs AS SELECT run_uuid, name AS run_name, source_type,"
    " source_name, entry_point_name, user_id, status, start_time, end_time, source_version,"
    " lifecycle_stage, artifact_uri, experiment_id, deleted_time FROM runs;"
    "CREATE OR REPLACE VIEW mlflow_params AS SELECT run_uuid, key, value FROM params;"
    "CREATE OR REPLACE VIEW mlflow_metrics AS"
    " SELECT run_uuid, key, value, timestamp, step, is_nan FROM metrics;"
    "CREATE OR REPLACE VIEW mlflow_tags AS SELECT run_uuid, key, value FROM tags;"
    "CREATE OR REPLACE VIEW mlflow_experiments AS SELECT * FROM experiments;"
    "CREATE OR REPLACE VIEW mlflow_registered_models AS SELECT * FROM registered_models;"
    "CREATE OR REPLACE VIEW mlflow_model_versions AS SELECT * FROM model_versions;"
    "CREATE OR REPLACE VIEW mlflow_artifacts AS SELECT run_uuid, path, size, sha256, store_uri,"
    " status, error, created_time, finished_time FROM trackd_artifacts";

static const char drop_views_sql[] =
    "DROP VIEW IF EXISTS mlflow_runs, mlflow_params, mlflow_metrics, mlflow_tags,"
    " mlflow_experiments, mlflow_registered_models, mlflow_model_versions, mlflow_artifacts";

static PGconn *connect_blocking(const struct trackd_config *cfg, const char *tool)
{
    struct pgconn_params p;
    char msg[512];
    if (pgconn_params_init(&p, cfg, msg, sizeof msg) != 0) {
        fprintf(stderr, "trackd %s: %s\n", tool, msg);
        return NULL;
    }
    PGconn *c = PQconnectdbParams(p.keys, p.values, 1);
    pgconn_params_clear(&p);
    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "trackd %s: cannot connect to PostgreSQL: %s", tool, PQerrorMessage(c));
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeProcessor(c, pgconn_notice, NULL);
    return c;
}

int dbobjects_list_artifacts(const struct trackd_config *cfg, const char *run_id, FILE *out)
{
    PGconn *c = connect_blocking(cfg, "artifacts");
    if (c == NULL)
        return 1;
    const char *params[] = {run_id};
    PGresult *r = PQexecParams(c,
                               "SELECT path, size, status, sha256, store_uri,"
                               " to_char(to_timestamp(created_time / 1000.0) AT TIME ZONE 'UTC',"
                               " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),"
                               " coalesce(to_char(to_timestamp(finished_time / 1000.0) AT TIME"
                               " ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '-'),"
                               " coalesce(error, '')"
                               " FROM trackd_artifacts WHERE run_uuid = $1 ORDER BY path",
                               1, NULL, params, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
        if (st && strcmp(st, "42P01") == 0)
            fprintf(stderr, "trackd artifacts: no artifact was ever logged through trackd to "
                            "this database (table trackd_artifacts does not exist)\n");
        else
            fprintf(stderr, "trackd artifacts: %s", PQerrorMessage(c));
        rc = 1;
    } else if (PQntuples(r) == 0) {
        fprintf(out, "run %s: no artifacts logged through trackd\n", run_id);
    } else {
        fprintf(out, "%-40s %12s %-8s %-20s %-20s %-64s %s\n", "PATH", "BYTES", "STATUS", "CREATED",
                "FINISHED", "SHA256", "STORE URI");
        for (int i = 0; i < PQntuples(r); i++) {
            fprintf(out, "%-40s %12s %-8s %-20s %-20s %-64s %s\n", PQgetvalue(r, i, 0),
                    PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 5),
                    PQgetvalue(r, i, 6), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4));
            if (PQgetvalue(r, i, 7)[0])
                fprintf(out, "    error: %s\n", PQgetvalue(r, i, 7));
        }
    }
    PQclear(r);
    PQfinish(c);
    return rc;
}

int dbobjects_drop_views(const struct trackd_config *cfg, FILE *out)
{
    PGconn *c = connect_blocking(cfg, "views drop");
    if (c == NULL)
        return 1;
    PGresult *r = PQexec(c, drop_views_sql);
    int rc = PQresultStatus(r) == PGRES_COMMAND_OK ? 0 : 1;
    if (rc == 0)
        fprintf(out,
                "mlflow_* views dropped from %s (set [postgres] seed_views = false, or the "
                "agent creates them again)\n",
                PQdb(c));
    else
        fprintf(stderr, "trackd views drop: %s", PQerrorMessage(c));
    PQclear(r);
    PQfinish(c);
    return rc;
}
