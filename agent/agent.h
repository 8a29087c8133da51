/*
 * The agent: everything `trackd [--config FILE]` runs until SIGTERM or SIGINT.
 */
#ifndef TRACKD_AGENT_H
#define TRACKD_AGENT_H

struct trackd_config;

/* Runs the agent in the foreground with the configuration at config_path (NULL: the built-in
 * defaults), overridden by TRACKD_<SECTION>_<KEY> variables. Returns the process's exit code:
 * 0 after a clean shutdown, 1 when it could not start. */
int agent_run(const char *config_path);

/* Loads path (NULL: defaults only), then the environment, then the cross-key checks; a problem
 * is printed to stderr with its file and line. Returns 0 or -errno. */
int agent_load_config(struct trackd_config *cfg, const char *path);

/* Refuses a [postgres] dsn libpq cannot parse, before anything echoes it; registers the
 * password (PGPASSWORD included) as a secret the log never prints. Returns 0 or -EINVAL,
 * logged. */
int agent_check_dsn(const struct trackd_config *cfg, const char *config_path);

#endif
