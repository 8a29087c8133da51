/*
 * The trackd binary's command line: the agent (agent.c) and the one-shot tools around it:
 * --check-config, the `trackd stats` client, `journal verify|status`, `artifacts RUN_ID`,
 * `views drop` and `import SOURCE`.
 */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <libpq-fe.h>
#include <uv.h>

#include "agent.h"
#include "config.h"
#include "dbobjects.h"
#include "identity.h"
#include "journal.h"
#include "pgconn.h"
#include "trackd_proto.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: trackd [--config FILE]              run the agent in the foreground\n"
            "       trackd --check-config [FILE]        validate a configuration and exit\n"
            "       trackd stats [--socket PATH | --config FILE]\n"
            "                                           print a running agent's counters\n"
            "       trackd journal verify|status [--config FILE | DIR]\n"
            "                                           check the journal, or summarise it\n"
            "       trackd artifacts RUN_ID [--config FILE]\n"
            "                                           list a run's uploads (trackd_artifacts)\n"
            "       trackd views drop [--config FILE]   drop the mlflow_* views\n"
            "       trackd import SOURCE [--config FILE] [--dry-run] [--experiment NAME]...\n"
            "                                           import an MLflow file store (mlruns/) or\n"
            "                                           sqlite:///mlflow.db into [postgres] dsn\n"
            "                                           (trackd import --help for more)\n"
            "       trackd --help | --version\n"
            "\n"
            "Every configuration key can be overridden by TRACKD_<SECTION>_<KEY>, e.g.\n"
            "TRACKD_POSTGRES_DSN or TRACKD_AGENT_SOCKET. See agent.toml.example.\n");
}

/* ---- `trackd stats` --------------------------------------------------------- */

static int read_frame(int fd, struct proto_reader *r, struct proto_header *h, const uint8_t **body,
                      int timeout_ms)
{
    for (;;) {
        int rc = proto_reader_next(r, h, body);
        if (rc != 0)
            return rc;
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, timeout_ms) <= 0)
            return -ETIMEDOUT;
        uint8_t *space;
        size_t n;
        if (proto_reader_space(r, 65536, &space, &n) != 0)
            return -ENOMEM;
        ssize_t got = read(fd, space, n);
        if (got <= 0)
            return -ECONNRESET;
        proto_reader_commit(r, (size_t)got);
    }
}

static int run_stats(const char *socket_path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", socket_path);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        fprintf(stderr, "trackd stats: cannot connect to %s: %s (is the agent running?)\n",
                socket_path, strerror(errno));
        return 1;
    }
    struct proto_buf out;
    proto_buf_init(&out, 0);
    proto_encode_empty(&out, 1, PROTO_STATS);
    if (write(fd, out.data, out.len) != (ssize_t)out.len) {
        fprintf(stderr, "trackd stats: write failed: %s\n", strerror(errno));
        return 1;
    }
    proto_buf_free(&out);
    struct proto_reader r;
    proto_reader_init(&r, PROTO_MAX_BODY_HARD);
    struct proto_header h;
    const uint8_t *body;
    struct proto_msg m;
    int rc = read_frame(fd, &r, &h, &body, 5000);
    if (rc != 1 || proto_msg_decode(&h, body, &m) != 0 || m.kind != PROTO_STATS_REPLY) {
        fprintf(stderr, "trackd stats: no valid reply from %s (%s)\n", socket_path,
                rc < 0 ? proto_strerror(rc) : "bad frame");
        proto_reader_free(&r);
        close(fd);
        return 1;
    }
    struct proto_str name;
    uint64_t value;
    while (proto_iter_next_stat(&m.u.stats.pairs, &name, &value))
        printf("%-24.*s %llu\n", (int)name.len, name.ptr, (unsigned long long)value);
    proto_reader_free(&r);
    close(fd);
    return 0;
}

/* What the command line asks for. */
struct cli {
    const char *config_path, *socket_path;
    const char *journal_cmd, *journal_dir; /* trackd journal verify|status [DIR] */
    const char *artifacts_run;             /* trackd artifacts RUN_ID */
    char **import_args;                    /* trackd import ARGS: NULL-terminated, for Python */
    bool check, stats, views_drop, import_help;
};

/* `trackd import ARGS`: --config FILE is the agent's; every other argument is the importer's
 * (trackd/importer/__main__.py), passed on in order. */
static int parse_import(int argc, char **argv, struct cli *cli, bool *done)
{
    cli->import_args = calloc((size_t)argc + 1, sizeof *cli->import_args);
    if (cli->import_args == NULL) {
        fprintf(stderr, "trackd: out of memory\n");
        return 1;
    }
    size_t n = 0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0 || strcmp(argv[i], "-c") == 0) {
            if (++i >= argc) {
                fprintf(stderr, "trackd import: --config needs a file\n");
                free(cli->import_args);
                cli->import_args = NULL;
                return 2;
            }
            cli->config_path = argv[i];
            continue;
        }
        if (strncmp(argv[i], "--config=", 9) == 0) {
            cli->config_path = argv[i] + 9;
            continue;
        }
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            cli->import_help = true;
        cli->import_args[n++] = argv[i];
    }
    *done = false;
    return 0;
}

/* Fills cli from argv. 0 to go on; else the exit status (0 after --help or --version, 2 for a
 * usage error, with a message on stderr). */
static int parse_args(int argc, char **argv, struct cli *cli, bool *done)
{
    *done = true;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(arg, "--version") == 0) {
            printf("trackd %s (protocol %d, libuv %s, libpq %d)\n", trackd_version, PROTO_VERSION,
                   uv_version_string(), PQlibVersion());
            return 0;
        } else if (strcmp(arg, "--config") == 0 || strcmp(arg, "-c") == 0) {
            if (++i >= argc) {
                fprintf(stderr, "trackd: --config needs a file\n");
                return 2;
            }
            cli->config_path = argv[i];
        } else if (strcmp(arg, "--check-config") == 0) {
            cli->check = true;
            if (i + 1 < argc && argv[i + 1][0] != '-')
                cli->config_path = argv[++i];
        } else if (strcmp(arg, "--socket") == 0 && i + 1 < argc) {
            cli->socket_path = argv[++i];
        } else if (strcmp(arg, "stats") == 0) {
            cli->stats = true;
        } else if (strcmp(arg, "journal") == 0 && i + 1 < argc) {
            cli->journal_cmd = argv[++i];
            if (strcmp(cli->journal_cmd, "verify") != 0 &&
                strcmp(cli->journal_cmd, "status") != 0) {
                fprintf(stderr, "trackd: journal needs 'verify' or 'status'\n");
                return 2;
            }
        } else if (strcmp(arg, "artifacts") == 0) {
            if (++i >= argc || argv[i][0] == '-') {
                fprintf(stderr, "trackd: artifacts needs a run id\n");
                return 2;
            }
            cli->artifacts_run = argv[i];
        } else if (strcmp(arg, "views") == 0) {
            if (++i >= argc || strcmp(argv[i], "drop") != 0) {
                fprintf(stderr, "trackd: views needs 'drop'\n");
                return 2;
            }
            cli->views_drop = true;
        } else if (strcmp(arg, "import") == 0) {
            return parse_import(argc - i - 1, argv + i + 1, cli, done);
        } else if (cli->journal_cmd && arg[0] != '-' && cli->journal_dir == NULL) {
            cli->journal_dir = arg;
        } else {
            fprintf(stderr, "trackd: unknown argument '%s'\n", arg);
            usage(stderr);
            return 2;
        }
    }
    *done = false;
    return 0;
}

/* --check-config: the file, the DSN and the users and groups the allow-lists name. */
static int run_check(const struct cli *cli)
{
    const char *name = cli->config_path ? cli->config_path : "(defaults)";
    struct trackd_config cfg;
    if (agent_load_config(&cfg, cli->config_path) != 0)
        return 1;
    int rc = 1;
    struct identity_rules rules;
    char why[512];
    if (agent_check_dsn(&cfg, cli->config_path) != 0) {
        /* logged */
    } else if (identity_rules_parse(&rules, cfg.allowed_uids, cfg.allowed_gids, cfg.shared_gids,
                                    why, sizeof why)) {
        fprintf(stderr, "trackd: %s: %s\n", name, why);
    } else {
        identity_rules_free(&rules);
        printf("%s: configuration OK\n", name);
        rc = 0;
    }
    config_free(&cfg);
    return rc;
}

/* trackd journal verify|status [DIR]: the configured journal unless DIR is given. */
static int run_journal(const struct cli *cli)
{
    struct trackd_config cfg;
    bool configured = cli->journal_dir == NULL;
    if (configured && agent_load_config(&cfg, cli->config_path) != 0)
        return 1;
    const char *dir = configured ? cfg.journal_dir : cli->journal_dir;
    int rc = strcmp(cli->journal_cmd, "verify") == 0 ? journal_verify(dir, stdout)
                                                     : journal_status(dir, stdout);
    if (rc < 0)
        fprintf(stderr, "trackd journal %s: %s: %s\n", cli->journal_cmd, dir, strerror(-rc));
    if (configured)
        config_free(&cfg);
    return rc == 0 ? 0 : 1;
}

/* The tools that need the configuration: artifacts RUN_ID, views drop, stats. */
static int run_tool(const struct cli *cli)
{
    bool stats_only = !cli->artifacts_run && !cli->views_drop;
    if (stats_only && cli->socket_path)
        return run_stats(cli->socket_path);
    struct trackd_config cfg;
    if (agent_load_config(&cfg, cli->config_path) != 0)
        return 1;
    int rc = cli->artifacts_run ? dbobjects_list_artifacts(&cfg, cli->artifacts_run, stdout)
             : cli->views_drop  ? dbobjects_drop_views(&cfg, stdout)
                                : run_stats(cfg.socket_path);
    config_free(&cfg);
    return rc;
}

/* The importer's Python: imports trackd.importer, or says how to install it. */
static const char import_boot[] =
    "import sys\n"
    "try:\n"
    "    from trackd.importer.__main__ import main\n"
    "except ImportError as e:\n"
    "    sys.exit(f'trackd import: {sys.executable} cannot load the importer ({e}). Install it: '\n"
    "             f\"{sys.executable} -m pip install 'trackd[import]', or set TRACKD_PYTHON to \"\n"
    "             'the Python that has it')\n"
    "sys.exit(main(sys.argv[1:]))\n";

/*
 * trackd import: the agent's configuration and schema check, then the importer (a Python
 * module of the trackd package: YAML, SQLite and COPY are the work of libraries there). The
 * DSN goes in TRACKD_IMPORT_DSN, a [postgres] password_file's password in PGPASSWORD, so
 * neither shows in the process list; --copy-artifacts' destination follows the agent's
 * (TRACKD_IMPORT_ARTIFACT_ROOT, TRACKD_IMPORT_MLFLOW_SERVER_URL, and the S3 endpoint and
 * region as MLflow's own variables unless they are set). TRACKD_PYTHON names the
 * interpreter (default python3 on PATH). Returns only on failure.
 */
static int run_import(const struct cli *cli)
{
    const char *python = getenv("TRACKD_PYTHON");
    if (python == NULL || python[0] == '\0')
        python = "python3";
    size_t n = 0;
    while (cli->import_args[n])
        n++;
    char **args = calloc(n + 4, sizeof *args);
    if (args == NULL) {
        fprintf(stderr, "trackd: out of memory\n");
        return 1;
    }
    args[0] = (char *)python;
    args[1] = "-c";
    args[2] = (char *)import_boot;
    memcpy(args + 3, cli->import_args, n * sizeof *args);

    if (!cli->import_help) {
        struct trackd_config cfg;
        if (agent_load_config(&cfg, cli->config_path) != 0) {
            free(args);
            return 1;
        }
        char msg[1024];
        struct pgconn_params p;
        int rc = pgconn_check_schema(&cfg, msg, sizeof msg);
        if (rc == PGCONN_CHECK_OK)
            rc = pgconn_params_init(&p, &cfg, msg, sizeof msg);
        if (rc != 0) {
            fprintf(stderr, "trackd import: %s (the target is [postgres] dsn of %s)\n", msg,
                    cli->config_path ? cli->config_path
                                     : "the built-in defaults and TRACKD_* variables: no "
                                       "--config FILE was given");
            config_free(&cfg);
            free(args);
            return 1;
        }
        rc = setenv("TRACKD_IMPORT_DSN", cfg.pg_dsn, 1);
        if (rc == 0 && p.password[0])
            rc = setenv("PGPASSWORD", p.password, 1);
        if (rc == 0)
            rc = setenv("TRACKD_IMPORT_ARTIFACT_ROOT", cfg.artifact_root, 1);
        if (rc == 0 && cfg.mlflow_server_url[0])
            rc = setenv("TRACKD_IMPORT_MLFLOW_SERVER_URL", cfg.mlflow_server_url, 1);
        if (rc == 0 && cfg.s3_endpoint_url[0])
            rc = setenv("MLFLOW_S3_ENDPOINT_URL", cfg.s3_endpoint_url, 0);
        if (rc == 0 && cfg.s3_region[0])
            rc = setenv("AWS_DEFAULT_REGION", cfg.s3_region, 0);
        pgconn_params_clear(&p);
        config_free(&cfg);
        if (rc != 0) {
            fprintf(stderr, "trackd import: cannot set the environment: %s\n", strerror(errno));
            free(args);
            return 1;
        }
    }
    fflush(NULL);
    execvp(python, args);
    fprintf(stderr,
            "trackd import: cannot run %s: %s. The importer is Python: install the trackd "
            "package with its import extra (pip install 'trackd[import]') and set TRACKD_PYTHON "
            "to that Python if it is not python3 on PATH\n",
            python, strerror(errno));
    free(args);
    return 1;
}

int main(int argc, char **argv)
{
    struct cli cli = {0};
    bool done;
    int rc = parse_args(argc, argv, &cli, &done);
    if (done)
        return rc;
    if (cli.check)
        return run_check(&cli);
    if (cli.journal_cmd)
        return run_journal(&cli);
    if (cli.import_args) {
        rc = run_import(&cli); /* returns only when the importer could not start */
        free(cli.import_args);
        return rc;
    }
    if (cli.artifacts_run || cli.views_drop || cli.stats)
        return run_tool(&cli);
    return agent_run(cli.config_path);
}
