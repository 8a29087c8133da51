/*
 * Unit tests for agent/validate.c. The key table holds the verdicts of MLflow's own rule,
 * re.match(r"^[/\w.\- :]*$", k) plus path_not_unique(k), computed with Python 3.11 for each
 * key, so a row that fails here is a place where trackd would disagree with MLflow. The
 * message texts asserted below were printed by MLflow 3.17.2's validation functions.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "validate.h"

/* A string literal and its length, embedded NULs included. */
#define K(s) s, sizeof(s) - 1
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

struct key_case {
    const char *key;
    size_t len;
    enum validate_code want;
};

/* Verdicts printed by Python 3.11 (Unicode 14.0); comments show the key as Python's ascii(). */
static const struct key_case key_cases[] = {
    {K(""), VALIDATE_BAD_KEY},          /* '' normpath gives "." */
    {K("."), VALIDATE_BAD_KEY},         /* '.' */
    {K(".."), VALIDATE_BAD_KEY},        /* '..' */
    {K("..."), VALIDATE_BAD_KEY},       /* '...' */
    {K("a"), VALIDATE_OK},              /* 'a' */
    {K("_"), VALIDATE_OK},              /* '_' */
    {K("a_b"), VALIDATE_OK},            /* 'a_b' */
    {K("A-Z"), VALIDATE_OK},            /* 'A-Z' */
    {K("a b"), VALIDATE_OK},            /* 'a b' */
    {K(" "), VALIDATE_OK},              /* ' ' */
    {K("a:b"), VALIDATE_OK},            /* 'a:b' */
    {K("C:/x"), VALIDATE_OK},           /* 'C:/x' */
    {K("-a"), VALIDATE_OK},             /* '-a' */
    {K(".a"), VALIDATE_OK},             /* '.a' */
    {K("a."), VALIDATE_OK},             /* 'a.' */
    {K("..a"), VALIDATE_BAD_KEY},       /* '..a' starts with ".." */
    {K("a..b"), VALIDATE_OK},           /* 'a..b' */
    {K("a..."), VALIDATE_OK},           /* 'a...' */
    {K("/a"), VALIDATE_BAD_KEY},        /* '/a' */
    {K("//a"), VALIDATE_BAD_KEY},       /* '//a' */
    {K("a/"), VALIDATE_BAD_KEY},        /* 'a/' */
    {K("a//b"), VALIDATE_BAD_KEY},      /* 'a//b' */
    {K("./a"), VALIDATE_BAD_KEY},       /* './a' */
    {K("a/./b"), VALIDATE_BAD_KEY},     /* 'a/./b' */
    {K("a/."), VALIDATE_BAD_KEY},       /* 'a/.' */
    {K("a/../b"), VALIDATE_BAD_KEY},    /* 'a/../b' */
    {K("a/.."), VALIDATE_BAD_KEY},      /* 'a/..' */
    {K("../a"), VALIDATE_BAD_KEY},      /* '../a' */
    {K(".../a"), VALIDATE_BAD_KEY},     /* '.../a' starts with ".." */
    {K("a/..b"), VALIDATE_OK},          /* 'a/..b' */
    {K("a/b.."), VALIDATE_OK},          /* 'a/b..' */
    {K("a/.b"), VALIDATE_OK},           /* 'a/.b' */
    {K("a/b/c"), VALIDATE_OK},          /* 'a/b/c' */
    {K("mlflow.runName"), VALIDATE_OK}, /* 'mlflow.runName' */
    {K("train/loss"), VALIDATE_OK},     /* 'train/loss' */
    {K("a\n"), VALIDATE_OK},            /* 'a\n' Python's $ matches before a final newline */
    {K("\n"), VALIDATE_OK},             /* '\n' same: MLflow accepts a lone newline */
    {K("a\n\n"), VALIDATE_BAD_KEY},     /* 'a\n\n' */
    {K("a\nb"), VALIDATE_BAD_KEY},      /* 'a\nb' */
    {K("\na"), VALIDATE_BAD_KEY},       /* '\na' */
    {K("a/\n"), VALIDATE_OK},           /* 'a/\n' same; the last component is "\n" */
    {K("a\t"), VALIDATE_BAD_KEY},       /* 'a\t' */
    {K("a\r"), VALIDATE_BAD_KEY},       /* 'a\r' */
    {K("a\000"), VALIDATE_BAD_KEY},     /* 'a\x00' */
    {K("a+b"), VALIDATE_BAD_KEY},       /* 'a+b' */
    {K("a@b"), VALIDATE_BAD_KEY},       /* 'a@b' */
    {K("a,b"), VALIDATE_BAD_KEY},       /* 'a,b' */
    {K("a=b"), VALIDATE_BAD_KEY},       /* 'a=b' */
    {K("a'b"), VALIDATE_BAD_KEY},       /* "a'b" */
    {K("a\"b"), VALIDATE_BAD_KEY},      /* 'a"b' */
    {K("a\\b"), VALIDATE_BAD_KEY},      /* 'a\\b' */
    {K("a\177"), VALIDATE_BAD_KEY},     /* 'a\x7f' */
    {K("\303\251"), VALIDATE_OK},       /* '\xe9' */
    /* 'e\u0301' combining acute: Mn, neither Python nor glibc */
    {K("e\314\201"), VALIDATE_BAD_KEY},
    {K("\346\225\260\346\215\256"), VALIDATE_OK}, /* '\u6570\u636e' */
    {K("\331\243"), VALIDATE_OK},                 /* '\u0663' ARABIC-INDIC DIGIT THREE */
    {K("\331\241\331\242\331\243"), VALIDATE_OK}, /* '\u0661\u0662\u0663' */
    {K("\303\237"), VALIDATE_OK},                 /* '\xdf' */
    {K("\316\251"), VALIDATE_OK},                 /* '\u03a9' */
    {K("\307\205"), VALIDATE_OK},                 /* '\u01c5' titlecase letter */
    {K("\312\260"), VALIDATE_OK},                 /* '\u02b0' modifier letter (Lm) */
    {K("\343\203\274"), VALIDATE_OK},             /* '\u30fc' */
    {K("\343\200\207"), VALIDATE_OK},             /* '\u3007' IDEOGRAPHIC NUMBER ZERO (Nl) */
    {K("\342\205\253"), VALIDATE_OK},             /* '\u216b' ROMAN NUMERAL TWELVE (Nl) */
    /* '\uff46\uff55\uff4c\uff4c' fullwidth letters */
    {K("\357\275\206\357\275\225\357\275\214\357\275\214"), VALIDATE_OK},
    {K("\360\235\220\200"), VALIDATE_OK}, /* '\U0001d400' MATHEMATICAL BOLD CAPITAL A, 4 bytes */
    {K("\302\262"), VALIDATE_OK},         /* '\xb2' SUPERSCRIPT TWO (No): Python yes, glibc no */
    {K("\302\275"), VALIDATE_OK}, /* '\xbd' VULGAR FRACTION ONE HALF (No): Python yes, glibc no */
    {K("\342\221\240"), VALIDATE_OK}, /* '\u2460' CIRCLED DIGIT ONE (No): Python yes, glibc no */
    /* '\u24b6' CIRCLED LATIN CAPITAL LETTER A (So): glibc yes, Python no */
    {K("\342\222\266"), VALIDATE_BAD_KEY},
    /* '\u0939\u093f\u0928\u094d\u0926\u0940' Hindi: vowel signs are marks: glibc yes, Python no */
    {K("\340\244\271\340\244\277\340\244\250"
       "\340\245\215\340\244\246\340\245\200"),
     VALIDATE_BAD_KEY},
    {K("\340\244\225"), VALIDATE_OK}, /* '\u0915' */
    /* '\u0915\u093f' KA + VOWEL SIGN I (Mc): glibc yes, Python no */
    {K("\340\244\225\340\244\277"), VALIDATE_BAD_KEY},
    {K("\327\220"), VALIDATE_OK}, /* '\u05d0' */
    /* '\u05d0\u05b0' ALEF + POINT SHEVA (Mn): glibc yes, Python no */
    {K("\327\220\326\260"), VALIDATE_BAD_KEY},
    /* '\u0345' COMBINING GREEK YPOGEGRAMMENI (Mn): glibc yes, Python no */
    {K("\315\205"), VALIDATE_BAD_KEY},
    {K("\360\237\230\200"), VALIDATE_BAD_KEY},   /* '\U0001f600' emoji (So) */
    {K("a\302\240b"), VALIDATE_BAD_KEY},         /* 'a\xa0b' NO-BREAK SPACE is not " " */
    {K("a\342\200\250b"), VALIDATE_BAD_KEY},     /* 'a\u2028b' */
    {K("\357\273\277a"), VALIDATE_BAD_KEY},      /* '\ufeffa' BOM (Cf) */
    {K("a\342\200\213b"), VALIDATE_BAD_KEY},     /* 'a\u200bb' ZERO WIDTH SPACE (Cf) */
    {K("\303\251/\303\251"), VALIDATE_OK},       /* '\xe9/\xe9' */
    {K("\303\251//\303\251"), VALIDATE_BAD_KEY}, /* '\xe9//\xe9' */
};

static void test_keys_match_python(void **state)
{
    static const char *const whats[] = {"metric", "param", "tag"};
    (void)state;

    for (size_t i = 0; i < COUNT(key_cases); i++) {
        for (size_t w = 0; w < COUNT(whats); w++) {
            struct validate_error err = {VALIDATE_OK, ""};
            int rc = validate_key(whats[w], key_cases[i].key, key_cases[i].len, &err);
            if ((rc == 0) != (key_cases[i].want == VALIDATE_OK) ||
                (rc != 0 && err.code != key_cases[i].want))
                fail_msg("key #%zu (%s): rc %d code %d, want %d: %s", i, whats[w], rc,
                         (int)err.code, (int)key_cases[i].want, err.message);
            if (rc != 0)
                assert_int_equal(rc, -EINVAL);
        }
    }
}

/* Repeats the UTF-8 encoding of one character n times; returns owned memory, free with free(). */
static char *repeat(const char *unit, size_t n, size_t *len_out)
{
    size_t u = strlen(unit);
    char *s = malloc(u * n + 1);

    assert_non_null(s);
    for (size_t i = 0; i < n; i++)
        memcpy(s + i * u, unit, u);
    s[u * n] = '\0';
    *len_out = u * n;
    return s;
}

static void test_key_length_in_code_points(void **state)
{
    static const char *const units[] = {"a", "\303\251" /* é */, "\346\225\260" /* 数 */,
                                        "\360\235\220\200" /* U+1D400 */};
    (void)state;

    for (size_t u = 0; u < COUNT(units); u++) {
        struct validate_error err;
        size_t len;
        char *s = repeat(units[u], 250, &len);
        assert_int_equal(validate_key("param", s, len, &err), 0);
        free(s);
        s = repeat(units[u], 251, &len);
        assert_int_equal(validate_key("param", s, len, &err), -EINVAL);
        assert_int_equal(err.code, VALIDATE_KEY_TOO_LONG);
        assert_string_equal(err.message,
                            "'Param key' exceeds the maximum length of 250 characters");
        assert_int_equal(validate_key("metric", s, len, &err), -EINVAL);
        assert_string_equal(err.message,
                            "'Metric name' exceeds the maximum length of 250 characters");
        assert_int_equal(validate_key("tag", s, len, &err), -EINVAL);
        assert_string_equal(err.message, "'key' exceeds the maximum length of 250 characters");
        free(s);
    }
}

/* MLflow checks characters and the path rule before the length, and so do we. */
static void test_key_checks_in_mlflow_order(void **state)
{
    struct validate_error err;
    size_t len;
    char *s = repeat("a", 300, &len);
    (void)state;

    s[299] = '/';
    assert_int_equal(validate_key("param", s, len, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_KEY);
    s[299] = '!';
    assert_int_equal(validate_key("param", s, len, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_KEY);
    free(s);
}

struct utf8_case {
    const char *s;
    size_t len;
    size_t want; /* SIZE_MAX: invalid */
};

static const struct utf8_case utf8_cases[] = {
    {K(""), 0},
    {K("abc"), 3},
    {K("a\000b"), 3},                            /* NUL is a code point */
    {K("0123456789abcdef\303\251"), 17},         /* fast path, then a 2-byte tail */
    {K("\302\200"), 1},                          /* U+0080, smallest 2-byte */
    {K("\337\277"), 1},                          /* U+07FF */
    {K("\340\240\200"), 1},                      /* U+0800, smallest 3-byte */
    {K("\355\237\277"), 1},                      /* U+D7FF, last before the surrogates */
    {K("\356\200\200"), 1},                      /* U+E000, first after them */
    {K("\357\277\277"), 1},                      /* U+FFFF */
    {K("\360\220\200\200"), 1},                  /* U+10000, smallest 4-byte */
    {K("\364\217\277\277"), 1},                  /* U+10FFFF */
    {K("\200"), SIZE_MAX},                       /* lone continuation byte */
    {K("a\277b"), SIZE_MAX},                     /* continuation byte inside ASCII */
    {K("\300\200"), SIZE_MAX},                   /* overlong NUL */
    {K("\301\277"), SIZE_MAX},                   /* overlong U+007F */
    {K("\340\200\200"), SIZE_MAX},               /* overlong 3-byte */
    {K("\340\237\277"), SIZE_MAX},               /* overlong U+07FF */
    {K("\355\240\200"), SIZE_MAX},               /* U+D800, surrogate */
    {K("\355\277\277"), SIZE_MAX},               /* U+DFFF, surrogate */
    {K("\360\200\200\200"), SIZE_MAX},           /* overlong 4-byte */
    {K("\360\217\277\277"), SIZE_MAX},           /* overlong U+FFFF */
    {K("\364\220\200\200"), SIZE_MAX},           /* U+110000 */
    {K("\365\200\200\200"), SIZE_MAX},           /* lead byte F5 */
    {K("\377"), SIZE_MAX},                       /* FF */
    {K("\342\202"), SIZE_MAX},                   /* truncated 3-byte */
    {K("\342\050\241"), SIZE_MAX},               /* bad second byte */
    {K("\360\237\230"), SIZE_MAX},               /* truncated 4-byte */
    {K("abcdefgh\360\237\230\200ijklmnop"), 17}, /* emoji between two fast-path blocks */
    {K("abcdefghijklmno\377"), SIZE_MAX},        /* bad byte after a fast-path block */
};

static void test_utf8_count(void **state)
{
    (void)state;
    for (size_t i = 0; i < COUNT(utf8_cases); i++) {
        size_t got = validate_utf8_count(utf8_cases[i].s, utf8_cases[i].len);
        if (got != utf8_cases[i].want)
            fail_msg("utf8 case #%zu: got %zu, want %zu", i, got, utf8_cases[i].want);
    }
}

/* Cuts fall after whole code points, by count, never inside a sequence. */
static void test_utf8_prefix(void **state)
{
    (void)state;
    static const char s[] = "a\303\251\342\202\254\360\237\230\200b"; /* a é € 😀 b */
    size_t len = sizeof s - 1;
    static const size_t want[] = {0, 1, 3, 6, 10, 11, 11};
    for (size_t max = 0; max < COUNT(want); max++)
        if (validate_utf8_prefix(s, len, max) != want[max])
            fail_msg("prefix of %zu code points: got %zu bytes, want %zu", max,
                     validate_utf8_prefix(s, len, max), want[max]);
    assert_int_equal(validate_utf8_prefix("", 0, 5), 0);
}

static void test_key_bad_utf8(void **state)
{
    struct validate_error err;
    (void)state;

    assert_int_equal(validate_key("param", K("a\377"), &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_UTF8);
    assert_string_equal(err.message,
                        "Invalid value \"a\\xff\" for parameter 'key' supplied: Names must be "
                        "valid UTF-8.");
    assert_int_equal(validate_key("tag", K("\355\240\200"), &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_UTF8);
}

struct str_case {
    const char *s;
    size_t len;
    bool ok;
};

static const struct str_case run_id_cases[] = {
    {K("0123456789abcdef0123456789abcdef"), true},
    {K("ffffffffffffffffffffffffffffffff"), true},
    {K("0123456789ABCDEF0123456789abcdef"), false},  /* MLflow makes lower case only */
    {K("0123456789abcdef0123456789abcde"), false},   /* 31 */
    {K("0123456789abcdef0123456789abcdef0"), false}, /* 33 */
    {K("0123456789abcdef0123456789abcdeg"), false},
    {K("01234567-89ab-cdef-0123-456789abcdef"), false}, /* uuid with dashes */
    {K("0123456789abcdef0123456789abcde\000"), false},
    {K(""), false},
};

static void test_run_ids(void **state)
{
    struct validate_error err;
    (void)state;

    for (size_t i = 0; i < COUNT(run_id_cases); i++) {
        int rc = validate_run_id(run_id_cases[i].s, run_id_cases[i].len, &err);
        if ((rc == 0) != run_id_cases[i].ok)
            fail_msg("run id #%zu: rc %d", i, rc);
        if (rc != 0)
            assert_int_equal(err.code, VALIDATE_BAD_RUN_ID);
    }
    assert_int_equal(validate_run_id(K("X\"y"), &err), -EINVAL);
    assert_string_equal(err.message, "Invalid value \"X\\\"y\" for parameter 'run_id' supplied: "
                                     "Run IDs must be 32 lower-case hexadecimal characters.");
}

/* Builds head + n copies of unit + tail; returns owned memory, free with free(). */
static char *build(const char *head, const char *unit, size_t n, const char *tail, size_t *len)
{
    size_t ul, hl = strlen(head), tl = strlen(tail);
    char *mid = repeat(unit, n, &ul);
    char *s = malloc(hl + ul + tl + 1);

    assert_non_null(s);
    memcpy(s, head, hl);
    memcpy(s + hl, mid, ul);
    memcpy(s + hl + ul, tail, tl + 1);
    free(mid);
    *len = hl + ul + tl;
    return s;
}

static void test_param_value_truncation(void **state)
{
    struct validate_error err;
    size_t len, keep;
    char *v;
    (void)state;

    /* 6000 two-byte characters: kept whole. */
    v = build("", "\303\251", 6000, "", &len);
    assert_int_equal(validate_param_value(K("lr"), v, len, &keep, &err), 0);
    assert_int_equal(keep, len);
    assert_int_equal(validate_param_value(K("lr"), v, len, NULL, &err), 0);
    free(v);

    /* 6001: cut after the 6000th character, on its boundary. */
    v = build("", "\303\251", 6001, "", &len);
    assert_int_equal(validate_param_value(K("lr"), v, len, &keep, &err), 0);
    assert_int_equal(keep, 12000);
    assert_int_equal(validate_param_value(K("lr"), v, len, NULL, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_VALUE_TOO_LONG);
    assert_string_equal(err.message,
                        "'Param value' exceeds the maximum length of 6000 characters (key \"lr\")");
    free(v);

    /* A 4-byte character as the 6000th is kept whole; the 6001st is dropped. */
    v = build("", "a", 5999, "\360\237\230\200b", &len);
    assert_int_equal(validate_param_value(K("lr"), v, len, &keep, &err), 0);
    assert_int_equal(keep, 5999 + 4);
    free(v);
    v = build("", "a", 5999, "\360\237\230\200", &len);
    assert_int_equal(validate_param_value(K("lr"), v, len, &keep, &err), 0);
    assert_int_equal(keep, len);
    free(v);

    assert_int_equal(validate_param_value(K("lr"), K(""), &keep, &err), 0);
    assert_int_equal(keep, 0);
}

static void test_tag_value_truncation(void **state)
{
    struct validate_error err;
    size_t len, keep;
    char *v;
    (void)state;

    v = build("", "\346\225\260", 8000, "", &len);
    assert_int_equal(validate_tag_value(K("k"), v, len, &keep, &err), 0);
    assert_int_equal(keep, len);
    free(v);
    v = build("", "\346\225\260", 8001, "", &len);
    assert_int_equal(validate_tag_value(K("k"), v, len, &keep, &err), 0);
    assert_int_equal(keep, 24000);
    assert_int_equal(validate_tag_value(K("k"), v, len, NULL, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_VALUE_TOO_LONG);
    assert_string_equal(err.message,
                        "'value' exceeds the maximum length of 8000 characters (key \"k\")");
    free(v);
    /* 6001 characters are fine for a tag. */
    v = build("", "a", 6001, "", &len);
    assert_int_equal(validate_tag_value(K("k"), v, len, NULL, &err), 0);
    free(v);
}

static void test_value_bad_text(void **state)
{
    struct validate_error err;
    size_t keep = 12345;
    (void)state;

    assert_int_equal(validate_param_value(K("lr"), K("0.1\377"), &keep, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_UTF8);
    assert_int_equal(keep, 12345);
    assert_string_equal(err.message,
                        "Param value for key \"lr\" is not valid UTF-8 (byte 0xff at offset 3)");
    assert_int_equal(validate_tag_value(K("k"), K("a\000b"), &keep, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_UTF8);
    assert_string_equal(err.message, "Tag value for key \"k\" contains a NUL character at offset "
                                     "1, which PostgreSQL text cannot store");
    /* Invalid UTF-8 past the truncation point still fails: the whole value is checked. */
    size_t len;
    char *v = build("", "a", 7000, "\300\200", &len);
    assert_int_equal(validate_param_value(K("lr"), v, len, &keep, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_UTF8);
    free(v);
}

static void test_names(void **state)
{
    struct validate_error err;
    size_t len;
    char *s;
    (void)state;

    assert_int_equal(validate_experiment_name(K(""), &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_NAME);
    assert_string_equal(err.message, "Invalid experiment name: ''");
    assert_int_equal(validate_experiment_name(K(" "), &err), 0);
    assert_int_equal(validate_experiment_name(K("Default"), &err), 0);

    s = repeat("\303\251", 256, &len);
    assert_int_equal(validate_experiment_name(s, len, &err), 0);
    free(s);
    s = repeat("\303\251", 257, &len);
    assert_int_equal(validate_experiment_name(s, len, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_NAME);
    assert_string_equal(err.message, "'name' exceeds the maximum length of 256 characters");
    free(s);

    assert_int_equal(validate_experiment_name(K("exp\000"), &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_UTF8);
    assert_string_equal(err.message, "Experiment name \"exp\\u0000\" contains a NUL character at "
                                     "offset 3, which PostgreSQL text cannot store");

    assert_int_equal(validate_run_name(K(""), &err), 0);
    s = repeat("\360\237\230\200", 250, &len);
    assert_int_equal(validate_run_name(s, len, &err), 0);
    free(s);
    s = repeat("\360\237\230\200", 251, &len);
    assert_int_equal(validate_run_name(s, len, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_NAME);
    assert_string_equal(err.message, "'run_name' exceeds the maximum length of 250 characters");
    free(s);
    assert_int_equal(validate_run_name(K("r\355\240\200"), &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_UTF8);
}

static void test_timestamps(void **state)
{
    struct validate_error err;
    (void)state;

    assert_int_equal(validate_timestamp(0, &err), 0);
    assert_int_equal(validate_timestamp(1700000000000, &err), 0);
    assert_int_equal(validate_timestamp(INT64_MAX, &err), 0);
    assert_int_equal(validate_timestamp(-1, &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_TIMESTAMP);
    assert_string_equal(err.message, "Invalid value -1 for parameter 'timestamp' supplied: "
                                     "Timestamp must be a nonnegative long (64-bit integer)");
    assert_int_equal(validate_timestamp(INT64_MIN, &err), -EINVAL);
    assert_non_null(strstr(err.message, "-9223372036854775808"));
}

static const struct str_case status_cases[] = {
    {K("RUNNING"), true},   {K("SCHEDULED"), true}, {K("FINISHED"), true},    {K("FAILED"), true},
    {K("KILLED"), true},    {K("running"), false},  {K("RUNNING "), false},   {K("RUN"), false},
    {K("RUNNINGX"), false}, {K(""), false},         {K("KILLED\000"), false},
};

static void test_statuses(void **state)
{
    struct validate_error err;
    (void)state;

    for (size_t i = 0; i < COUNT(status_cases); i++) {
        int rc = validate_status(status_cases[i].s, status_cases[i].len, &err);
        if ((rc == 0) != status_cases[i].ok)
            fail_msg("status #%zu: rc %d", i, rc);
        if (rc != 0)
            assert_int_equal(err.code, VALIDATE_BAD_STATUS);
    }
    assert_int_equal(validate_status(K("running"), &err), -EINVAL);
    assert_string_equal(err.message,
                        "Could not get run status corresponding to string running. Valid run "
                        "status strings: ['RUNNING', 'SCHEDULED', 'FINISHED', 'FAILED', 'KILLED']");
}

static void test_metric_sanitize(void **state)
{
    struct validate_metric_value r;
    (void)state;

    r = validate_metric_sanitize(NAN);
    assert_true(r.is_nan);
    assert_true(r.value == 0.0 && !signbit(r.value));
    r = validate_metric_sanitize(-NAN);
    assert_true(r.is_nan);
    assert_true(r.value == 0.0);
    r = validate_metric_sanitize(INFINITY);
    assert_false(r.is_nan);
    assert_true(r.value == DBL_MAX);
    r = validate_metric_sanitize(-INFINITY);
    assert_false(r.is_nan);
    assert_true(r.value == -DBL_MAX);
    r = validate_metric_sanitize(1.5);
    assert_false(r.is_nan);
    assert_true(r.value == 1.5);
    r = validate_metric_sanitize(-0.0); /* Python stores it as is */
    assert_false(r.is_nan);
    assert_true(r.value == 0.0 && signbit(r.value));
    r = validate_metric_sanitize(DBL_MAX);
    assert_true(r.value == DBL_MAX && !r.is_nan);
    r = validate_metric_sanitize(DBL_TRUE_MIN);
    assert_true(r.value == DBL_TRUE_MIN && !r.is_nan);
}

/* Full texts as MLflow 3.17.2 prints them for the same calls. */
static void test_mlflow_messages(void **state)
{
    struct validate_error err;
    (void)state;

    /* _validate_metric_name("a//b") */
    assert_int_equal(validate_key("metric", K("a//b"), &err), -EINVAL);
    assert_int_equal(err.code, VALIDATE_BAD_KEY);
    assert_string_equal(err.message,
                        "Invalid value \"a//b\" for parameter 'name' supplied: Names may be "
                        "treated as files in certain cases, and must not resolve to other names "
                        "when treated as such. This name would resolve to 'a/b'");
    /* _validate_param_name("a!b") */
    assert_int_equal(validate_key("param", K("a!b"), &err), -EINVAL);
    assert_string_equal(err.message,
                        "Invalid value \"a!b\" for parameter 'key' supplied: Names may only "
                        "contain alphanumerics, underscores (_), dashes (-), periods (.), spaces "
                        "( ), colon(:) and slashes (/).");
    /* _validate_tag_name("a\u00e9/./b\n"): JSON escapes on the left, repr() on the right */
    assert_int_equal(validate_key("tag", K("a\303\251/./b\n"), &err), -EINVAL);
    assert_string_equal(err.message,
                        "Invalid value \"a\\u00e9/./b\\n\" for parameter 'key' supplied: Names may "
                        "be treated as files in certain cases, and must not resolve to other names "
                        "when treated as such. This name would resolve to 'a\303\251/b\\n'");
    /* normpath("") is "." and normpath("a/../..") is ".." */
    assert_int_equal(validate_key("tag", K(""), &err), -EINVAL);
    assert_non_null(strstr(err.message, "\"\" for parameter 'key'"));
    assert_non_null(strstr(err.message, "resolve to '.'"));
    assert_int_equal(validate_key("tag", K("a/../.."), &err), -EINVAL);
    assert_non_null(strstr(err.message, "resolve to '..'"));
    assert_int_equal(validate_key("tag", K("//a/./"), &err), -EINVAL);
    assert_non_null(strstr(err.message, "resolve to '//a'"));
}

/* Shown keys stop after 100 bytes of escapes, so every message fits its buffer. */
static void test_message_truncation(void **state)
{
    struct validate_error err;
    size_t len;
    char *s;
    (void)state;

    s = repeat("\360\237\230\200", 300, &len); /* each shows as \ud83d\ude00, 12 bytes */
    assert_int_equal(validate_key("param", s, len, &err), -EINVAL);
    assert_non_null(strstr(err.message, "\"\\ud83d\\ude00\\ud83d\\ude00"));
    assert_non_null(strstr(err.message, "\\ud83d\\ude00...\" for parameter 'key' supplied"));
    assert_true(strlen(err.message) < sizeof(err.message) - 1);
    free(s);

    s = build("a//", "\303\251", 800, "", &len); /* too long to show its normalised form */
    assert_int_equal(validate_key("param", s, len, &err), -EINVAL);
    assert_non_null(strstr(err.message, "This name would resolve to '...'"));
    free(s);

    s = build("a//", "\303\251", 200, "", &len);
    assert_int_equal(validate_key("param", s, len, &err), -EINVAL);
    assert_non_null(strstr(err.message, "This name would resolve to 'a/\303\251"));
    assert_non_null(strstr(err.message, "\303\251...'"));
    assert_true(strlen(err.message) < sizeof(err.message) - 1);
    free(s);

    s = repeat("\001", 400, &len); /* control bytes: \u0001 each */
    assert_int_equal(validate_status(s, len, &err), -EINVAL);
    assert_non_null(strstr(err.message, "\\u0001\\u0001..."));
    for (const char *p = err.message; *p != '\0'; p++)
        assert_true(*p >= 0x20 && *p < 0x7F);
    free(s);
}

static void test_err_optional(void **state)
{
    size_t keep;
    (void)state;

    assert_int_equal(validate_key("metric", K("a//b"), NULL), -EINVAL);
    assert_int_equal(validate_key("metric", K("a\377"), NULL), -EINVAL);
    assert_int_equal(validate_key("metric", NULL, 0, NULL), -EINVAL);
    assert_int_equal(validate_run_id(K("x"), NULL), -EINVAL);
    assert_int_equal(validate_status(NULL, 0, NULL), -EINVAL);
    assert_int_equal(validate_timestamp(-5, NULL), -EINVAL);
    assert_int_equal(validate_experiment_name(NULL, 0, NULL), -EINVAL);
    assert_int_equal(validate_param_value(NULL, 0, NULL, 0, &keep, NULL), 0);
    assert_int_equal(keep, 0);
}

static void test_code_names(void **state)
{
    (void)state;
    assert_string_equal(validate_code_name(VALIDATE_OK), "OK");
    assert_string_equal(validate_code_name(VALIDATE_BAD_UTF8), "INVALID_UTF8");
    assert_string_equal(validate_code_name(VALIDATE_BAD_KEY), "INVALID_KEY");
    assert_string_equal(validate_code_name(VALIDATE_KEY_TOO_LONG), "KEY_TOO_LONG");
    assert_string_equal(validate_code_name(VALIDATE_VALUE_TOO_LONG), "VALUE_TOO_LONG");
    assert_string_equal(validate_code_name(VALIDATE_BAD_RUN_ID), "INVALID_RUN_ID");
    assert_string_equal(validate_code_name(VALIDATE_BAD_TIMESTAMP), "INVALID_TIMESTAMP");
    assert_string_equal(validate_code_name(VALIDATE_BAD_STATUS), "INVALID_STATUS");
    assert_string_equal(validate_code_name(VALIDATE_BAD_NAME), "INVALID_NAME");
    assert_string_equal(validate_code_name((enum validate_code)99), "UNKNOWN");
    /* Wire values are part of the protocol. */
    assert_int_equal(VALIDATE_BAD_UTF8, 1);
    assert_int_equal(VALIDATE_BAD_NAME, 8);
}

/* The first non-ASCII key creates the locale; racing threads must all see it ready. */
static void *classify_thread(void *arg)
{
    int *bad = arg;

    for (int i = 0; i < 200; i++) {
        if (validate_key("param", K("\346\225\260\346\215\256"), NULL) != 0 ||
            validate_key("param", K("\342\222\266"), NULL) != -EINVAL)
            (*bad)++;
    }
    return NULL;
}

static void test_threads_share_lazy_locale(void **state)
{
    pthread_t t[4];
    int bad[4] = {0, 0, 0, 0};
    (void)state;

    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&t[i], NULL, classify_thread, &bad[i]), 0);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(bad[i], 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads_share_lazy_locale), /* first: nothing made the locale yet */
        cmocka_unit_test(test_keys_match_python),
        cmocka_unit_test(test_key_length_in_code_points),
        cmocka_unit_test(test_key_checks_in_mlflow_order),
        cmocka_unit_test(test_utf8_count),
        cmocka_unit_test(test_utf8_prefix),
        cmocka_unit_test(test_key_bad_utf8),
        cmocka_unit_test(test_run_ids),
        cmocka_unit_test(test_param_value_truncation),
        cmocka_unit_test(test_tag_value_truncation),
        cmocka_unit_test(test_value_bad_text),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_timestamps),
        cmocka_unit_test(test_statuses),
        cmocka_unit_test(test_metric_sanitize),
        cmocka_unit_test(test_mlflow_messages),
        cmocka_unit_test(test_message_truncation),
        cmocka_unit_test(test_err_optional),
        cmocka_unit_test(test_code_names),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
