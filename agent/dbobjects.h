/*
 * trackd's own objects in MLflow's database, apart from MLflow's tables: the upload ledger
 * trackd_artifacts, and the optional mlflow_* convenience views. Also the command-line
 * tools that read or remove them (`trackd artifacts RUN_ID`, `trackd views drop`), which
 * connect on their own with the agent's configuration.
 */
#ifndef TRACKD_DBOBJECTS_H
#define TRACKD_DBOBJECTS_H

#include <stdio.h>

struct trackd_config;

/* CREATE ... IF NOT EXISTS for the ledger; safe to run at every connection. */
extern const char dbobjects_ledger_sql[];
/* CREATE OR REPLACE VIEW for every mlflow_* view ([postgres] seed_views). */
extern const char dbobjects_views_sql[];

/* `trackd artifacts RUN_ID`: prints the run's ledger rows. Returns an exit code. */
int dbobjects_list_artifacts(const struct trackd_config *cfg, const char *run_id, FILE *out);
/* `trackd views drop`: drops the mlflow_* views. Returns an exit code. */
int dbobjects_drop_views(const struct trackd_config *cfg, FILE *out);

#endif
