/*
 * trackd's own objects in MLflow's database, apart from MLflow's tables: the upload ledger
 * trackd_artifacts, the run owners, and the optional mlflow_* convenience views. Also the
 * command-line tools that read or remove them (`trackd artifacts RUN_ID`, `trackd views drop`),
 * which connect on their own with the agent's configuration.
 */
#ifndef TRACKD_DBOBJECTS_H
#define TRACKD_DBOBJECTS_H

#include <stdio.h>

struct trackd_config;

/* CREATE ... IF NOT EXISTS for the ledger; safe to run at every connection. */
extern const char dbobjects_ledger_sql[];
/* trackd_run_owners: who started each run trackd created (uid, shared_gids; agent/owners.h).
 * No foreign key to runs: MLflow's migrations and `mlflow gc` never meet this table. */
extern const char dbobjects_run_owners_table_sql[];
/* The owners of runs $1 (text[]): run_uuid, uid (NULL: no row), shared_gids, user_id; a run
 * that does not exist has no row. The second form is for a database without the table. */
extern const char dbobjects_run_owners_sql[];
extern const char dbobjects_run_users_sql[];
/*
 * trackd_journal_progress: one row per agent journal (journal_id, agent/journaldir.h), saying
 * how far its records are committed: every record below lsn and the first `events` events of
 * record lsn. Written in the same transaction as the events, so a crash between COMMIT and
 * the journal's own marker (committed.lsn) cannot make the replay apply them twice.
 */
extern const char dbobjects_progress_table_sql[];
/* Upsert of the progress row: $1 journal id, $2 lsn, $3 events, $4 now ms. */
extern const char dbobjects_progress_sql[];
/* CREATE OR REPLACE VIEW for every mlflow_* view ([postgres] seed_views). */
extern const char dbobjects_views_sql[];

/* `trackd artifacts RUN_ID`: prints the run's ledger rows. Returns an exit code. */
int dbobjects_list_artifacts(const struct trackd_config *cfg, const char *run_id, FILE *out);
/* `trackd views drop`: drops the mlflow_* views. Returns an exit code. */
int dbobjects_drop_views(const struct trackd_config *cfg, FILE *out);

#endif
