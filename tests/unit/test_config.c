/*
 * Unit tests for agent/config.c: defaults, every accepted value form, the exact text of each
 * class of error, environment overrides, DSN redaction in config_dump() and the shipped
 * agent.toml.example. Usage: test_config [path/to/agent.toml.example]
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "destination.h"
#include "identity.h"
#include "log.h"
#include "pgconn.h"

static const char *example_path = "../agent.toml.example";

/* Loads text as "t.toml" into a fresh config; returns the formatted error, or "" on success. */
static const char *load(struct trackd_config *c, const char *text, size_t len, int *rc)
{
    static char buf[1024];
    struct config_error err;

    assert_int_equal(config_init(c), 0);
    *rc = config_load_string(c, text, len, "t.toml", &err);
    buf[0] = '\0';
    if (*rc)
        config_format_error(&err, buf, sizeof buf);
    return buf;
}

/* Returns the formatted error for text, which must fail with -EINVAL. */
static const char *load_error(const char *text)
{
    struct trackd_config c;
    int rc;
    const char *msg = load(&c, text, strlen(text), &rc);

    assert_int_equal(rc, -EINVAL);
    config_free(&c);
    return msg;
}

/* Returns config_dump() output, owned by the caller. */
static char *dump(const struct trackd_config *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);

    assert_non_null(f);
    config_dump(c, f);
    assert_int_equal(fclose(f), 0);
    return text;
}

static void test_defaults(void **state)
{
    struct trackd_config c;

    (void)state;
    assert_int_equal(config_init(&c), 0);
    assert_string_equal(c.socket_path, "/run/trackd/trackd.sock");
    assert_int_equal(c.socket_mode, 0660);
    assert_string_equal(c.socket_group, "");
    assert_int_equal(c.max_connections, 1024);
    assert_int_equal(c.max_frame_bytes, 1048576);
    assert_int_equal(c.log_level, CONFIG_LOG_INFO);
    assert_int_equal(c.shutdown_grace_ms, 10000);
    assert_string_equal(c.pg_dsn, "postgresql:///mlflow");
    assert_string_equal(c.pg_password_file, "");
    assert_int_equal(c.pg_connect_timeout_ms, 10000);
    assert_string_equal(c.artifact_root, "/var/lib/trackd/artifacts");
    assert_string_equal(c.allowed_revisions, "");
    assert_string_equal(c.journal_dir, "/var/lib/trackd/journal");
    assert_int_equal(c.batch_max_rows, 20000);
    assert_int_equal(c.batch_max_bytes, 8388608);
    assert_int_equal(c.batch_max_age_ms, 100);
    assert_int_equal(c.max_pending_bytes, 20971520);
    config_free(&c);
    config_free(&c); /* documented as safe */
}

static const char all_values[] = "\xEF\xBB\xBF# every key, every value form\r\n"
                                 "\r\n"
                                 "[ agent ]   # spaces inside the brackets are allowed\r\n"
                                 "socket = \"/tmp/t\\u00e9st\\t\\\"q\\\"\\\\.sock\"\r\n"
                                 "socket_mode = 0o600\n"
                                 "\tsocket_group = 'wheel\\n'\n"
                                 "max_connections = +10\n"
                                 "max_frame_bytes = 0x10_0000\n"
                                 "log_level = \"debug\"\n"
                                 "shutdown_grace_ms = -0\n"
                                 "[postgres]\n"
                                 "dsn=\"host=db password='se cret'\"#comment right after\n"
                                 "password_file = \"/etc/\xC3\xA9t\xC3\xA9\"\n"
                                 "connect_timeout_ms = 1_000\n"
                                 "[mlflow]\n"
                                 "default_artifact_root = \"s3://b/\\U0001F600\"\n"
                                 "allowed_revisions = 'a,b # not a comment'\n"
                                 "[journal]\n"
                                 "dir = '/j'\n"
                                 "[batch]\n"
                                 "max_rows = 10_000_000\n"
                                 "max_bytes = 0x40000000\n"
                                 "max_age_ms = 60000\n"
                                 "max_pending_bytes = 17179869184"; /* no final newline */

static void test_value_forms(void **state)
{
    struct trackd_config c;
    int rc;

    (void)state;
    assert_string_equal(load(&c, all_values, strlen(all_values), &rc), "");
    assert_int_equal(rc, 0);
    assert_string_equal(c.socket_path, "/tmp/t\xC3\xA9st\t\"q\"\\.sock");
    assert_int_equal(c.socket_mode, 0600);
    assert_string_equal(c.socket_group, "wheel\\n");
    assert_int_equal(c.max_connections, 10);
    assert_int_equal(c.max_frame_bytes, 1048576);
    assert_int_equal(c.log_level, CONFIG_LOG_DEBUG);
    assert_int_equal(c.shutdown_grace_ms, 0);
    assert_string_equal(c.pg_dsn, "host=db password='se cret'");
    assert_string_equal(c.pg_password_file, "/etc/\xC3\xA9t\xC3\xA9");
    assert_int_equal(c.pg_connect_timeout_ms, 1000);
    assert_string_equal(c.artifact_root, "s3://b/\xF0\x9F\x98\x80");
    assert_string_equal(c.allowed_revisions, "a,b # not a comment");
    assert_string_equal(c.journal_dir, "/j");
    assert_int_equal(c.batch_max_rows, 10000000);
    assert_int_equal(c.batch_max_bytes, 1073741824);
    assert_int_equal(c.batch_max_age_ms, 60000);
    assert_true(c.max_pending_bytes == UINT64_C(17179869184));
    config_free(&c);
}

static void test_partial_file_keeps_defaults(void **state)
{
    struct trackd_config c;
    int rc;
    const char text[] = "[batch]\nmax_rows = 5\n\n[agent]\n";

    (void)state;
    assert_string_equal(load(&c, text, strlen(text), &rc), "");
    assert_int_equal(c.batch_max_rows, 5);
    assert_int_equal(c.batch_max_bytes, 8388608);
    assert_string_equal(c.socket_path, "/run/trackd/trackd.sock");
    config_free(&c);

    assert_string_equal(load(&c, NULL, 0, &rc), "");
    assert_int_equal(rc, 0);
    config_free(&c);
}

struct error_case {
    const char *text;
    const char *want;
};

static const struct error_case error_cases[] = {
    /* structure */
    {"[agent]\nsockt = \"x\"\n", "t.toml:2:1: unknown key \"sockt\" in [agent]"},
    {"[agent]\n\n      sockt = 1\n", "t.toml:3:7: unknown key \"sockt\" in [agent]"},
    {"[agnt]\n", "t.toml:1:2: unknown section [agnt]"},
    {"[agent]\nsocket = \"/a\"\nsocket = \"/b\"\n",
     "t.toml:3:1: duplicate key \"socket\" in [agent]; it was already set on line 2"},
    {"[agent]\n[batch]\n[agent]\n",
     "t.toml:3:1: duplicate section [agent]; it was already opened on line 1"},
    {"socket = \"/x\"\n", "t.toml:1:1: key \"socket\" must be inside a section such as [agent]"},
    {"[agent]\nsocket \"/x\"\n", "t.toml:2:1: expected \"key = value\""},
    {"[agent]\n= 5\n", "t.toml:2:1: expected \"key = value\""},
    {"[agent]\nsocket.path = \"/x\"\n", "t.toml:2:7: dotted keys are not supported"},
    {"[agent]\n\"socket\" = \"/x\"\n", "t.toml:2:1: quoted keys are not supported"},
    {"[agent.sub]\n", "t.toml:1:7: dotted section names are not supported"},
    {"[\"agent\"]\n", "t.toml:1:2: quoted section names are not supported"},
    {"[[agent]]\n", "t.toml:1:1: arrays of tables ([[...]]) are not supported"},
    {"[agent\n", "t.toml:1:7: expected \"]\" after the section name"},
    {"[]\n", "t.toml:1:2: expected a section name after \"[\""},
    {"[agent] x\n", "t.toml:1:9: unexpected text after the section header"},
    {"[agent]\r\r\n", "t.toml:1:8: unexpected text after the section header"},
    /* unsupported TOML */
    {"[agent]\nsocket = [\"/a\"]\n", "t.toml:2:10: arrays are not supported"},
    {"[agent]\nsocket = { a = 1 }\n", "t.toml:2:10: inline tables are not supported"},
    {"[agent]\nsocket = \"\"\"/x\"\"\"\n", "t.toml:2:10: multi-line strings are not supported"},
    {"[agent]\nsocket = '''/x'''\n", "t.toml:2:10: multi-line strings are not supported"},
    {"[batch]\nmax_rows = 1.5\n", "t.toml:2:12: floats are not supported"},
    {"[batch]\nmax_rows = 1e3\n", "t.toml:2:12: floats are not supported"},
    {"[batch]\nmax_rows = inf\n", "t.toml:2:12: floats are not supported"},
    {"[batch]\nmax_rows = -nan\n", "t.toml:2:12: floats are not supported"},
    {"[batch]\nmax_rows = 1979-05-27\n", "t.toml:2:12: dates and times are not supported"},
    {"[batch]\nmax_rows = 07:32:00\n", "t.toml:2:12: dates and times are not supported"},
    /* values */
    {"[agent]\nsocket = /run/x\n",
     "t.toml:2:10: expected a value: a quoted string, an integer, true or false"},
    {"[agent]\nsocket = tru\n",
     "t.toml:2:10: expected a value: a quoted string, an integer, true or false"},
    {"[agent]\nsocket =\n", "t.toml:2:9: expected a value after \"=\""},
    {"[agent]\nsocket = # nothing\n", "t.toml:2:10: expected a value after \"=\""},
    {"[agent]\nsocket = \"/x\" y\n", "t.toml:2:15: unexpected text after the value"},
    {"[agent]\nsocket = \"/\xC3\xA9\" y\n", "t.toml:2:15: unexpected text after the value"},
    {"[batch]\nmax_rows = 10 MB\n", "t.toml:2:15: unexpected text after the value"},
    /* types and ranges */
    {"[postgres]\ndsn = 5\n", "t.toml:2:7: value for postgres.dsn must be a string"},
    {"[agent]\nsocket = true\n", "t.toml:2:10: value for agent.socket must be a string"},
    {"[agent]\nsocket = false\n", "t.toml:2:10: value for agent.socket must be a string"},
    {"[batch]\nmax_rows = \"5\"\n",
     "t.toml:2:12: value for batch.max_rows must be an integer between 1 and 10000000"},
    {"[batch]\nmax_rows = true\n",
     "t.toml:2:12: value for batch.max_rows must be an integer between 1 and 10000000"},
    {"[batch]\nmax_rows = 0\n",
     "t.toml:2:12: value for batch.max_rows must be an integer between 1 and 10000000"},
    {"[batch]\nmax_rows = 10_000_001\n",
     "t.toml:2:12: value for batch.max_rows must be an integer between 1 and 10000000"},
    {"[batch]\nmax_rows = -1\n",
     "t.toml:2:12: value for batch.max_rows must be an integer between 1 and 10000000"},
    {"[batch]\nmax_rows = 99999999999999999999999\n",
     "t.toml:2:12: value for batch.max_rows must be an integer between 1 and 10000000"},
    {"[batch]\nmax_pending_bytes = 17179869185\n",
     "t.toml:2:21: value for batch.max_pending_bytes must be an integer between 1048576 and "
     "17179869184"},
    {"[agent]\nsocket_mode = 0o1000\n",
     "t.toml:2:15: value for agent.socket_mode must be an octal file mode between 0o000 and "
     "0o777"},
    {"[agent]\nlog_level = \"verbose\"\n",
     "t.toml:2:13: value for agent.log_level must be one of \"error\", \"warn\", \"info\" or "
     "\"debug\""},
    {"[agent]\nlog_level = 3\n",
     "t.toml:2:13: value for agent.log_level must be one of \"error\", \"warn\", \"info\" or "
     "\"debug\""},
    {"[journal]\nfsync = 'often'\n",
     "t.toml:2:9: value for journal.fsync must be one of \"always\", \"interval\" or \"never\""},
    {"[agent]\nsocket = \"\"\n", "t.toml:2:10: value for agent.socket must not be empty"},
    {"[journal]\ndir = ''\n", "t.toml:2:7: value for journal.dir must not be empty"},
    /* integer syntax */
    {"[agent]\nsocket_mode = 0660\n",
     "t.toml:2:15: \"0660\" is not a valid integer: leading zeros are not allowed (write octal "
     "with 0o, as in 0o660)"},
    {"[batch]\nmax_rows = 1__0\n",
     "t.toml:2:12: \"1__0\" is not a valid integer: underscores must sit between digits"},
    {"[batch]\nmax_rows = 10_\n",
     "t.toml:2:12: \"10_\" is not a valid integer: underscores must sit between digits"},
    {"[batch]\nmax_rows = 0x_10\n",
     "t.toml:2:12: \"0x_10\" is not a valid integer: underscores must sit between digits"},
    {"[batch]\nmax_rows = 0b101\n",
     "t.toml:2:12: \"0b101\" is not a valid integer: binary integers are not supported"},
    {"[batch]\nmax_rows = -0x10\n",
     "t.toml:2:12: \"-0x10\" is not a valid integer: a sign is not allowed before 0x or 0o"},
    {"[batch]\nmax_rows = 0x\n", "t.toml:2:12: \"0x\" is not a valid integer: it has no digits"},
    {"[batch]\nmax_rows = 12abc\n",
     "t.toml:2:12: \"12abc\" is not a valid integer: it has a character that is not a digit"},
    {"[agent]\nsocket_mode = 0o8\n", "t.toml:2:15: \"0o8\" is not a valid integer: it has a "
                                     "character that is not an octal digit"},
    /* strings */
    {"[agent]\nsocket = \"/abc\n", "t.toml:2:10: string is missing its closing quote"},
    {"[agent]\nsocket = '/abc\n", "t.toml:2:10: string is missing its closing quote"},
    {"[agent]\nsocket = \"/abc\\\n", "t.toml:2:10: string is missing its closing quote"},
    {"[agent]\nsocket = \"a\\qb\"\n", "t.toml:2:12: invalid escape \"\\q\" in string"},
    {"[agent]\nsocket = \"a\\ b\"\n", "t.toml:2:12: invalid escape in string"},
    {"[agent]\nsocket = \"a\\u12\"\n", "t.toml:2:12: escape \"\\u\" needs 4 hex digits"},
    {"[agent]\nsocket = \"a\\U0001F60\"\n", "t.toml:2:12: escape \"\\U\" needs 8 hex digits"},
    {"[agent]\nsocket = \"\\uD800\"\n",
     "t.toml:2:11: escape \"\\uD800\" is not a Unicode scalar value"},
    {"[agent]\nsocket = \"\\U00110000\"\n",
     "t.toml:2:11: escape \"\\U00110000\" is not a Unicode scalar value"},
    {"[agent]\nsocket = \"\\u0000\"\n", "t.toml:2:11: NUL characters are not allowed in strings"},
    {"[agent]\nsocket = \"a\x01"
     "b\"\n",
     "t.toml:2:12: control character U+0001 must be escaped in a string"},
    {"[agent]\nsocket = 'a\x7f'\n",
     "t.toml:2:12: control character U+007F must be escaped in a string"},
    {"[agent]\nsocket = \"a\xff\"\n", "t.toml:2:12: string contains invalid UTF-8"},
    {"[agent]\nsocket = \"a\xC0\xAF\"\n", "t.toml:2:12: string contains invalid UTF-8"},
    {"[agent]\nsocket = '\xED\xA0\x80'\n", "t.toml:2:11: string contains invalid UTF-8"},
    {"[agent]\nsocket = \"\xE2\x82\"\n", "t.toml:2:11: string contains invalid UTF-8"},
    /* comments */
    {"# bad \x01 comment\n", "t.toml:1:7: control character U+0001 is not allowed in a comment"},
    {"[agent] # caf\xC3\n", "t.toml:1:14: comment contains invalid UTF-8"},
};

static void test_errors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof error_cases / sizeof error_cases[0]; i++) {
        const char *got = load_error(error_cases[i].text);
        if (strcmp(got, error_cases[i].want) != 0)
            print_error("case %zu: %s\n", i, error_cases[i].text);
        assert_string_equal(got, error_cases[i].want);
    }
}

static void test_string_length_limits(void **state)
{
    char text[300];
    char path[109];

    (void)state;
    memset(path, 'a', sizeof path - 1);
    path[0] = '/';
    path[107] = '\0'; /* 107 bytes: the longest sun_path */
    snprintf(text, sizeof text, "[agent]\nsocket = \"%s\"\n", path);
    {
        struct trackd_config c;
        int rc;
        assert_string_equal(load(&c, text, strlen(text), &rc), "");
        assert_int_equal(strlen(c.socket_path), 107);
        config_free(&c);
    }
    path[107] = 'a';
    path[108] = '\0';
    snprintf(text, sizeof text, "[agent]\nsocket = \"%s\"\n", path);
    assert_string_equal(load_error(text),
                        "t.toml:2:10: value for agent.socket must be at most 107 bytes long");
}

static void test_size_limits(void **state)
{
    struct trackd_config c;
    struct config_error err;
    char msg[600];
    size_t big = 1024 * 1024 + 1;
    char *text = malloc(big);

    (void)state;
    assert_non_null(text);
    /* A 64 KiB comment line is fine; one byte more is not. */
    memset(text, 'x', big);
    text[0] = '#';
    text[65536] = '\n';
    assert_int_equal(config_init(&c), 0);
    assert_int_equal(config_load_string(&c, text, 65537, "t.toml", &err), 0);
    text[65536] = 'x';
    text[65537] = '\n';
    assert_int_equal(config_load_string(&c, text, 65538, "t.toml", &err), -EINVAL);
    config_format_error(&err, msg, sizeof msg);
    assert_string_equal(msg, "t.toml:1:1: line is longer than 65536 bytes");

    assert_int_equal(config_load_string(&c, text, big, "t.toml", &err), -EFBIG);
    config_format_error(&err, msg, sizeof msg);
    assert_string_equal(msg, "t.toml: file is larger than 1048576 bytes");
    config_free(&c);
    free(text);
}

static void test_failed_load_changes_nothing(void **state)
{
    struct trackd_config c;
    struct config_error err;
    const char text[] = "[agent]\nsocket = \"/new\"\nsocket_group = \"g\"\nmax_connections = 0\n";

    (void)state;
    assert_int_equal(config_init(&c), 0);
    assert_int_equal(config_load_string(&c, text, strlen(text), "t.toml", &err), -EINVAL);
    assert_string_equal(c.socket_path, "/run/trackd/trackd.sock");
    assert_string_equal(c.socket_group, "");
    assert_int_equal(c.max_connections, 1024);
    /* A second file replaces strings set by the first and frees the old ones (ASan checks). */
    assert_int_equal(config_load_string(&c, text, 43, "t.toml", &err), 0);
    assert_string_equal(c.socket_path, "/new");
    assert_string_equal(c.socket_group, "g");
    assert_int_equal(config_load_string(&c, "[agent]\nsocket='/newer'", 23, NULL, &err), 0);
    assert_string_equal(c.socket_path, "/newer");
    assert_int_equal(config_load_string(&c, "[x]", 3, NULL, NULL), -EINVAL);
    assert_int_equal(config_load_string(&c, "[x]", 3, NULL, &err), -EINVAL);
    assert_string_equal(err.where, "<string>");
    config_free(&c);
}

static void test_env_overrides(void **state)
{
    struct trackd_config c;
    struct config_error err;
    char *envp[] = {
        "PATH=/bin",
        "TRACKD_POSTGRES_DSN=host=x dbname=y",
        "TRACKD_AGENT_SOCKET_MODE=0640",
        "TRACKD_AGENT_SOCKET_GROUP=",
        "TRACKD_BATCH_MAX_AGE_MS=0x10",
        "TRACKD_BATCH_MAX_ROWS=1_000",
        "TRACKD_AGENT_LOG_LEVEL=warn",
        "TRACKD_BATCH_MAX_PENDING_BYTES=17179869184",
        "TRACKD_MLFLOW_DEFAULT_ARTIFACT_ROOT=s3://bucket/root",
        "TRACKD_AGENT_SOCKET=/a",
        "TRACKD_AGENT_SOCKET=/b", /* later entries win, as in a shell */
        "TRACKD_SOCKET=/ignored", /* not a config section: another tool's variable */
        "trackd_agent_socket=/ignored",
        "TRACKD_AGENT",
        NULL,
    };

    (void)state;
    assert_int_equal(config_init(&c), 0);
    free(c.socket_group);
    c.socket_group = strdup("from-file");
    assert_int_equal(config_apply_env(&c, envp, &err), 0);
    assert_string_equal(c.pg_dsn, "host=x dbname=y");
    assert_int_equal(c.socket_mode, 0640);
    assert_string_equal(c.socket_group, "");
    assert_int_equal(c.batch_max_age_ms, 16);
    assert_int_equal(c.batch_max_rows, 1000);
    assert_int_equal(c.log_level, CONFIG_LOG_WARN);
    assert_true(c.max_pending_bytes == UINT64_C(17179869184));
    assert_string_equal(c.artifact_root, "s3://bucket/root");
    assert_string_equal(c.socket_path, "/b");
    assert_int_equal(config_apply_env(&c, NULL, &err), 0);
    config_free(&c);
}

static void test_env_errors(void **state)
{
    static const struct {
        const char *var;
        const char *want;
    } cases[] = {
        {"TRACKD_BATCH_MAX_ROWS=0",
         "TRACKD_BATCH_MAX_ROWS: must be an integer between 1 and 10000000"},
        {"TRACKD_BATCH_MAX_ROWS=abc",
         "TRACKD_BATCH_MAX_ROWS: must be an integer between 1 and 10000000"},
        {"TRACKD_BATCH_MAX_ROWS=",
         "TRACKD_BATCH_MAX_ROWS: must be an integer between 1 and 10000000"},
        {"TRACKD_BATCH_MAX_ROWS= 5",
         "TRACKD_BATCH_MAX_ROWS: must be an integer between 1 and 10000000"},
        {"TRACKD_BATCH_MAX_ROWS=010",
         "TRACKD_BATCH_MAX_ROWS: must be an integer between 1 and 10000000"},
        {"TRACKD_BATCH_MAX_ROWS=-5",
         "TRACKD_BATCH_MAX_ROWS: must be an integer between 1 and 10000000"},
        {"TRACKD_BATCH_MAX_ROWS=99999999999999999999999",
         "TRACKD_BATCH_MAX_ROWS: must be an integer between 1 and 10000000"},
        {"TRACKD_AGENT_SOCKET_MODE=0999",
         "TRACKD_AGENT_SOCKET_MODE: must be an octal file mode between 0o000 and 0o777"},
        {"TRACKD_AGENT_SOCKET_MODE=01000",
         "TRACKD_AGENT_SOCKET_MODE: must be an octal file mode between 0o000 and 0o777"},
        {"TRACKD_AGENT_LOG_LEVEL=INFO",
         "TRACKD_AGENT_LOG_LEVEL: must be one of \"error\", \"warn\", \"info\" or \"debug\""},
        {"TRACKD_AGENT_SOCKET=", "TRACKD_AGENT_SOCKET: must not be empty"},
        {"TRACKD_AGENT_SOCKT=/x", "TRACKD_AGENT_SOCKT: unknown setting: [agent] has no such key"},
        {"TRACKD_BATCH_=1", "TRACKD_BATCH_: unknown setting: [batch] has no such key"},
    };

    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct trackd_config c;
        struct config_error err;
        char msg[600];
        /* The good variable first: a failure must not apply it either. */
        char *envp[] = {"TRACKD_JOURNAL_DIR=/elsewhere", (char *)cases[i].var, NULL};

        assert_int_equal(config_init(&c), 0);
        assert_int_equal(config_apply_env(&c, envp, &err), -EINVAL);
        assert_int_equal(err.line, 0);
        config_format_error(&err, msg, sizeof msg);
        assert_string_equal(msg, cases[i].want);
        assert_string_equal(c.journal_dir, "/var/lib/trackd/journal");
        config_free(&c);
    }
}

static void test_env_mode_forms(void **state)
{
    static const struct {
        const char *var;
        unsigned mode;
    } cases[] = {
        {"TRACKD_AGENT_SOCKET_MODE=0660", 0660},  {"TRACKD_AGENT_SOCKET_MODE=0o600", 0600},
        {"TRACKD_AGENT_SOCKET_MODE=0x1ff", 0777}, {"TRACKD_AGENT_SOCKET_MODE=384", 0600},
        {"TRACKD_AGENT_SOCKET_MODE=0", 0},
    };

    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct trackd_config c;
        char *envp[] = {(char *)cases[i].var, NULL};
        assert_int_equal(config_init(&c), 0);
        assert_int_equal(config_apply_env(&c, envp, NULL), 0);
        assert_int_equal(c.socket_mode, cases[i].mode);
        config_free(&c);
    }
}

/* config_check: cross-key rules, and no password in the URI the agent hands every client. */
static void test_check(void **state)
{
    (void)state;
    static const struct {
        const char *toml;
        const char *error; /* NULL: accepted */
    } cases[] = {
        {"[mlflow]\nbackend_uri = 'postgresql://reader@db:5432/mlflow?sslmode=require'", NULL},
        {"[mlflow]\nbackend_uri = 'postgresql://reader:s3cret@db/mlflow'", "carries a password"},
        {"[mlflow]\nbackend_uri = 'postgresql://reader@db/mlflow?sslmode=require&password=x'",
         "carries a password"},
        {"[mlflow]\nbackend_uri = 'mysql+pymysql://u:p@db/mlflow'", "carries a password"},
        {"[mlflow]\nbackend_uri = 'sqlite:////var/lib/mlflow.db'", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct trackd_config c;
        int rc;
        char msg[512] = "";
        assert_string_equal(load(&c, cases[i].toml, strlen(cases[i].toml), &rc), "");
        int check = config_check(&c, msg, sizeof msg);
        if (cases[i].error == NULL) {
            assert_int_equal(check, 0);
        } else {
            assert_int_equal(check, -EINVAL);
            assert_non_null(strstr(msg, cases[i].error));
            assert_null(strstr(msg, "s3cret"));
        }
        config_free(&c);
    }
}

static void test_dump_redacts_dsn(void **state)
{
    static const struct {
        const char *dsn;
        const char *want; /* the dsn line in the dump */
    } cases[] = {
        {"host=db password=secret user=u", "dsn = \"host=db password=**** user=u\""},
        {"host=db password = 'se cret\\' x' user=u", "dsn = \"host=db password = **** user=u\""},
        {"password=a\\ b", "dsn = \"password=****\""},
        {"password=", "dsn = \"password=****\""},
        {"postgresql://alice:secret@db:5432/mlflow?sslmode=require&password=secret",
         "dsn = \"postgresql://alice:****@db:5432/mlflow?sslmode=require&password=****\""},
        {"postgres://alice:secret@db1,db2/mlflow",
         "dsn = \"postgres://alice:****@db1,db2/mlflow\""},
        {"postgresql://alice@db/mlflow", "dsn = \"postgresql://alice@db/mlflow\""},
        {"postgresql:///mlflow?password=secret&x=1",
         "dsn = \"postgresql:///mlflow?password=****&x=1\""},
        {"dbname=postgresql://a:secret@h/db host=h", "dsn = \"dbname=**** host=h\""},
        {"host=db dbname=mlflow", "dsn = \"host=db dbname=mlflow\""},
    };

    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct trackd_config c;
        char *text;
        assert_int_equal(config_init(&c), 0);
        free(c.pg_dsn);
        c.pg_dsn = strdup(cases[i].dsn);
        text = dump(&c);
        if (!strstr(text, cases[i].want))
            print_error("case %zu: %s\n", i, text);
        assert_non_null(strstr(text, cases[i].want));
        /* The password never shows (the word "secret" does, in the S3 secret key's docs). */
        assert_null(strstr(text, ":secret@"));
        assert_null(strstr(text, "password=secret"));
        assert_null(strstr(text, "a:secret"));
        free(text);
        config_free(&c);
    }
}

/* A dump is valid input and reproduces every value (the DSN has no password to mask). */
static void test_dump_round_trip(void **state)
{
    struct trackd_config a, b;
    struct config_error err;
    char *first, *second;
    int rc;

    (void)state;
    assert_string_equal(load(&a, all_values, strlen(all_values), &rc), "");
    free(a.pg_dsn);
    a.pg_dsn = strdup("host=db user=\"x\"\n");
    first = dump(&a);
    assert_non_null(strstr(first, "[agent]\n# "));
    assert_non_null(strstr(first, "\nsocket_mode = 0o600\n"));
    assert_non_null(strstr(first, "\nlog_level = \"debug\"\n"));
    assert_non_null(strstr(first, "\nmax_pending_bytes = 17179869184\n"));
    assert_int_equal(config_init(&b), 0);
    assert_int_equal(config_load_string(&b, first, strlen(first), "dump", &err), 0);
    assert_string_equal(b.pg_dsn, "host=db user=\"x\"\n");
    assert_string_equal(b.socket_path, a.socket_path);
    second = dump(&b);
    assert_string_equal(first, second);
    free(first);
    free(second);
    config_free(&a);
    config_free(&b);
}

static void test_example_file(void **state)
{
    struct trackd_config defaults, c;
    struct config_error err;
    char msg[600] = "";
    char *want, *got;

    (void)state;
    assert_int_equal(config_init(&defaults), 0);
    assert_int_equal(config_init(&c), 0);
    if (config_load_file(&c, example_path, &err) != 0)
        config_format_error(&err, msg, sizeof msg);
    assert_string_equal(msg, "");
    /* The example documents the defaults, so loading it changes nothing. */
    want = dump(&defaults);
    got = dump(&c);
    assert_string_equal(got, want);
    free(want);
    free(got);
    config_free(&defaults);
    config_free(&c);
}

static void test_file_errors(void **state)
{
    struct trackd_config c;
    struct config_error err;
    char msg[600];

    (void)state;
    assert_int_equal(config_init(&c), 0);
    assert_int_equal(config_load_file(&c, "/nonexistent/agent.toml", &err), -ENOENT);
    assert_int_equal(err.line, 0);
    config_format_error(&err, msg, sizeof msg);
    assert_string_equal(msg,
                        "/nonexistent/agent.toml: cannot open file: No such file or directory");
    assert_int_equal(config_load_file(&c, "/", &err), -EISDIR);
    config_format_error(&err, msg, sizeof msg);
    assert_string_equal(msg, "/: cannot read file: Is a directory");
    assert_int_equal(config_load_file(&c, "/nonexistent", NULL), -ENOENT);
    config_free(&c);
}

static void test_format_error_truncates(void **state)
{
    struct config_error err = {"agent.toml", 7, 9, "unknown key \"sockt\" in [agent]"};
    char small[8];
    const char *want = "agent.toml:7:9: unknown key \"sockt\" in [agent]";

    (void)state;
    assert_int_equal(config_format_error(&err, small, sizeof small), (int)strlen(want));
    assert_string_equal(small, "agent.t");
}

/* Allow-lists: names and ids, blanks, the agent's own uid always served, clear refusals;
 * supplementary groups count; shared_gids keeps the peer's groups that are listed. */
static void test_identity_rules(void **state)
{
    (void)state;
    struct identity_rules r;
    char msg[512];
    gid_t g1[] = {12345};
    assert_int_equal(identity_rules_parse(&r, "", " , ", NULL, msg, sizeof msg), 0);
    assert_true(identity_allowed(&r, 12345, g1, 1)); /* no rule: everyone */
    identity_rules_free(&r);

    assert_int_equal(identity_rules_parse(&r, " 54321 ,root", "777", "", msg, sizeof msg), 0);
    assert_int_equal(r.nuids, 2);
    assert_int_equal(r.uids[0], 54321);
    assert_int_equal(r.uids[1], 0);
    gid_t one[] = {1}, g777[] = {777}, g778[] = {778}, supp[] = {778, 5, 777};
    assert_true(identity_allowed(&r, 54321, one, 1));
    assert_true(identity_allowed(&r, 4242, g777, 1));
    assert_true(identity_allowed(&r, 4242, supp, 3)); /* a supplementary group */
    if (geteuid() != 4242) {                          /* the agent's own uid is always served */
        assert_false(identity_allowed(&r, 4242, g778, 1));
        assert_false(identity_allowed(&r, 4242, supp, 2));
    }
    identity_rules_free(&r);

    assert_int_equal(identity_rules_parse(&r, "", "", "900, 5,900 ,root", msg, sizeof msg), 0);
    assert_int_equal(r.nshared, 3);
    assert_int_equal(r.shared[0], 0);
    assert_int_equal(r.shared[1], 5);
    assert_int_equal(r.shared[2], 900);
    struct peer p;
    gid_t groups[] = {100, 900, 7, 5};
    identity_peer(&r, 1001, groups, 4, &p);
    assert_int_equal(p.uid, 1001);
    assert_int_equal(p.nshared, 2);
    assert_int_equal(p.shared[0], 5);
    assert_int_equal(p.shared[1], 900);
    identity_peer(&r, 1002, groups, 1, &p);
    assert_int_equal(p.nshared, 0);
    identity_rules_free(&r);

    assert_int_equal(identity_rules_parse(&r, "no-such-user-xyz", "", "", msg, sizeof msg),
                     -EINVAL);
    assert_string_equal(msg, "[agent] allowed_uids: no such user \"no-such-user-xyz\"");
    assert_int_equal(identity_rules_parse(&r, "", "99999999999", "", msg, sizeof msg), -EINVAL);
    assert_string_equal(msg, "[agent] allowed_gids: id out of range \"99999999999\"");
    assert_null(r.uids);
    assert_int_equal(identity_rules_parse(&r, "", "", "no-such-group-xyz", msg, sizeof msg),
                     -EINVAL);
    assert_string_equal(msg, "[agent] shared_gids: no such group \"no-such-group-xyz\"");
    assert_int_equal(identity_rules_parse(&r, "", "", "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17",
                                          msg, sizeof msg),
                     -EINVAL);
    assert_string_equal(msg, "[agent] shared_gids: 17 groups; at most 16");
}

/* Registered secrets never survive into a line, however often and wherever they appear. */
static void test_log_scrub(void **state)
{
    (void)state;
    log_add_secret("hunter22");
    log_add_secret("pw");
    log_add_secret("");
    char line[128] = "auth hunter22 failed; hunter22hunter22 at end pw";
    log_scrub(line);
    assert_string_equal(line, "auth **** failed; ******** at end **");
}

/* destination.c: artifacts go below the operator's roots only, and never through "..". */
static void test_destinations(void **state)
{
    (void)state;
    struct trackd_config c;
    int rc;
    const char *toml = "[mlflow]\ndefault_artifact_root = '/srv/art/'\n"
                       "[artifacts]\nallowed_roots = 'file:///data/team, s3://bucket/ml'\n"
                       "mlflow_server_url = 'http://mlflow.example:5000'\n";
    assert_string_equal(load(&c, toml, strlen(toml), &rc), "");
    static const struct {
        const char *uri;
        int ok;
    } cases[] = {
        {"/srv/art", 1},
        {"/srv/art/1/abc/artifacts", 1},
        {"file:///srv/art/1", 1},
        {"/srv/artefacts/1", 0}, /* a prefix, not a parent */
        {"/srv/art/../etc", 0},
        {"/srv/art//x", 0},
        {"/data/team/x", 1},
        {"file:///data/team/./x", 0},
        {"/root/secret", 0},
        {"s3://bucket/ml/exp", 1},
        {"s3://bucket/other", 0},
        {"s3://bucket/mlx", 0},
        {"mlflow-artifacts:/exp/1", 1},
        {"mlflow-artifacts://mlflow.example:5000/exp", 1},
        {"mlflow-artifacts://127.0.0.1:58123/x", 0},
        {"http://mlflow.example:5000/api/2.0/mlflow-artifacts/artifacts/x", 1},
        {"https://evil.example/x", 0},
        {"relative/path", 0},
    };
    char why[600];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *p =
            destination_problem(&c, cases[i].uri, strlen(cases[i].uri), why, sizeof why);
        if ((p == NULL) != cases[i].ok)
            fail_msg("%s: expected %s, got %s", cases[i].uri, cases[i].ok ? "allowed" : "refused",
                     p ? p : "allowed");
    }
    assert_non_null(strstr(destination_problem(&c, "/root/x", 7, why, sizeof why),
                           "add its root to [artifacts] allowed_roots"));
    char root[256];
    const char *below = NULL;
    assert_int_equal(destination_local_root(&c, "file:///data/team/e/r/artifacts/f.txt", root,
                                            sizeof root, &below),
                     0);
    assert_string_equal(root, "/data/team");
    assert_string_equal(below, "e/r/artifacts/f.txt");
    assert_int_equal(destination_local_root(&c, "s3://bucket/ml/x", root, sizeof root, &below),
                     -EPERM);
    assert_int_equal(destination_local_root(&c, "/etc/passwd", root, sizeof root, &below), -EPERM);
    config_free(&c);

    /* Without a server, mlflow-artifacts: goes nowhere. */
    toml = "[mlflow]\ndefault_artifact_root = '/srv/art'\n";
    assert_string_equal(load(&c, toml, strlen(toml), &rc), "");
    assert_non_null(destination_problem(&c, "mlflow-artifacts:/x", 19, why, sizeof why));
    config_free(&c);
}

/* A client's string cannot start a log line of its own or send terminal escapes. */
static void test_log_escape(void **state)
{
    (void)state;
    char out[64];
    assert_int_equal(log_escape("ana\n2026-11-30T00:00:00.000Z WARN uid 0", out, sizeof out), 40);
    assert_string_equal(out, "ana\\n2026-11-30T00:00:00.000Z WARN uid 0");
    log_escape("a\tb\rc\x1b[31md\x7f\xc3\xa9", out, sizeof out);
    assert_string_equal(out, "a\\tb\\rc\\x1b[31md\\x7f\xc3\xa9"); /* UTF-8 stays */
    /* Truncated at a whole escape, never half of one. */
    assert_int_equal(log_escape("ab\n", out, 4), 2);
    assert_string_equal(out, "ab");
}

/* A DSN libpq cannot parse is refused, and the reason never quotes the string. */
static void test_dsn_check_elides_quoted_pieces(void **state)
{
    (void)state;
    char msg[256];
    assert_int_equal(pgconn_dsn_check("host=/x password=s3cr3t-one s3cr3t-one", msg, sizeof msg),
                     -EINVAL);
    assert_string_equal(msg, "missing \"=\" after \"...\" in connection info string");
    assert_int_equal(pgconn_dsn_check("host=/x password=s3cr3t-two dbname=m", msg, sizeof msg), 0);
    char line[64] = "x s3cr3t-two y";
    log_scrub(line);
    assert_string_equal(line, "x **** y");
}

/* Formats t as "host|hostaddr|port;..." with "-" for NULL. */
static const char *targets_text(const struct pgconn_targets *t)
{
    static char buf[512];
    size_t o = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < t->n; i++)
        o += (size_t)snprintf(
            buf + o, sizeof buf - o, "%s%s|%s|%s", i ? ";" : "", t->v[i].host ? t->v[i].host : "-",
            t->v[i].hostaddr ? t->v[i].hostaddr : "-", t->v[i].port ? t->v[i].port : "-");
    return buf;
}

/* libpq's pairing of host, hostaddr and port lists, as the writer walks them. */
static void test_dsn_targets(void **state)
{
    (void)state;
    static const struct {
        const char *dsn;
        const char *want;
        unsigned timeout_ms;
    } ok[] = {
        {"dbname=m", "", 0},
        {"host=/run/pg dbname=m", "/run/pg|-|-", 0},
        {"host=::1,127.0.0.1 port=5433", "::1|-|5433;127.0.0.1|-|5433", 0},
        {"host=db1,db2 port=5432,5433 connect_timeout=1", "db1|-|5432;db2|-|5433", 2000},
        {"host=db hostaddr=10.1.2.3 connect_timeout=7", "db|10.1.2.3|-", 7000},
        {"hostaddr=127.0.0.1,::1 port=1,2", "-|127.0.0.1|1;-|::1|2", 0},
        {"postgresql://a:5432,b:6543/m?target_session_attrs=read-write", "a|-|5432;b|-|6543", 0},
        {"host=db connect_timeout=0", "db|-|-", 0},
        /* An empty entry is libpq's default socket directory: libpq walks that list itself. */
        {"host=,db2", "", 0},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        struct pgconn_targets t;
        char msg[256] = "";
        assert_int_equal(pgconn_targets_parse(ok[i].dsn, &t, msg, sizeof msg), 0);
        assert_string_equal(targets_text(&t), ok[i].want);
        assert_int_equal(t.timeout_ms, ok[i].timeout_ms);
        pgconn_targets_free(&t);
    }
    struct pgconn_targets t;
    char msg[256];
    assert_int_equal(pgconn_targets_parse("host=a,b,c port=1,2", &t, msg, sizeof msg), -EINVAL);
    assert_string_equal(msg, "its 3 host, 0 hostaddr and 2 port entries do not pair up (give one "
                             "port for all hosts, or one per host)");
    assert_int_equal(pgconn_targets_parse("host=a,b hostaddr=1.2.3.4", &t, msg, sizeof msg),
                     -EINVAL);
    assert_int_equal(pgconn_dsn_check("host=a,b port=1,2,3", msg, sizeof msg), -EINVAL);

    /* The overrides go after the configuration's keys, so libpq takes them over the DSN's. */
    struct trackd_config c;
    assert_int_equal(config_init(&c), 0);
    struct pgconn_params p;
    assert_int_equal(pgconn_params_init(&p, &c, msg, sizeof msg), 0);
    size_t base = p.n_base;
    pgconn_params_target(&p, "db1", "10.0.0.1", NULL);
    assert_string_equal(p.keys[base], "host");
    assert_string_equal(p.values[base + 1], "10.0.0.1");
    assert_null(p.keys[base + 2]);
    pgconn_params_target(&p, "/run/pg", NULL, "5433");
    assert_string_equal(p.keys[base + 1], "port");
    assert_null(p.keys[base + 2]);
    pgconn_params_clear(&p);
    config_free(&c);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_value_forms),
        cmocka_unit_test(test_partial_file_keeps_defaults),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_string_length_limits),
        cmocka_unit_test(test_size_limits),
        cmocka_unit_test(test_failed_load_changes_nothing),
        cmocka_unit_test(test_env_overrides),
        cmocka_unit_test(test_env_errors),
        cmocka_unit_test(test_env_mode_forms),
        cmocka_unit_test(test_dump_redacts_dsn),
        cmocka_unit_test(test_dump_round_trip),
        cmocka_unit_test(test_example_file),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_format_error_truncates),
        cmocka_unit_test(test_identity_rules),
        cmocka_unit_test(test_log_scrub),
        cmocka_unit_test(test_log_escape),
        cmocka_unit_test(test_destinations),
        cmocka_unit_test(test_check),
        cmocka_unit_test(test_dsn_check_elides_quoted_pieces),
        cmocka_unit_test(test_dsn_targets),
    };

    if (argc > 1)
        example_path = argv[1];
    return cmocka_run_group_tests(tests, NULL, NULL);
}
