/*
 * toml — the reader of the TOML subset agent.toml is written in: [table] headers and keys with
 * bare names, values that are one-line basic or literal strings, integers (decimal, 0x, 0o, _
 * between digits) or booleans, and comments, all in UTF-8. Anything else is refused with line and
 * column. The reader knows no table or key: it hands each header, key and value to callbacks
 * (config.c's key table), which decide what they mean.
 */
#ifndef TRACKD_TOML_H
#define TRACKD_TOML_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Longest line, in bytes; a decoded string is never longer than its line. */
#define TOML_MAX_LINE (64 * 1024)

/* Why toml_parse() refused its text. message is a sentence without a trailing period. */
struct toml_error {
    int line;   /* 1-based */
    int column; /* 1-based; counts UTF-8 characters, not bytes */
    char message[512];
};

enum toml_type { TOML_STRING, TOML_INTEGER, TOML_BOOL };

struct toml_value {
    enum toml_type type;
    const char *at;  /* its first character in the text, for toml_fail() */
    const char *end; /* the first byte after it */
    const char *str; /* TOML_STRING: decoded, NUL-terminated, no NUL inside; borrowed (see cb) */
    size_t len;      /* TOML_STRING: bytes in str */
    uint64_t mag;    /* TOML_INTEGER: the magnitude; TOML_BOOL: 1 for true, 0 for false */
    bool neg;        /* TOML_INTEGER: written with a minus sign (also "-0") */
    bool overflow;   /* TOML_INTEGER: more than 64 bits of digits; mag is then meaningless */
};

/* toml_parse()'s state, which the callbacks pass back to toml_fail() and toml_line(). */
struct toml_reader;

/*
 * A "[name]" header; at is its "[" and name (borrowed from the text, not NUL-terminated) the
 * bare name between the brackets.
 */
typedef int (*toml_table_cb)(void *ctx, struct toml_reader *r, const char *at, const char *name,
                             size_t len);
/* The key of a "key = value" line, borrowed like a table name, before its value is read. */
typedef int (*toml_key_cb)(void *ctx, struct toml_reader *r, const char *key, size_t len);
/* That key's value; v and v->str are valid until the callback returns. */
typedef int (*toml_value_cb)(void *ctx, struct toml_reader *r, const struct toml_value *v);

/*
 * Called in the order of the text. Each returns 0 to go on, or a negative code that ends the parse
 * and becomes toml_parse()'s result: -EINVAL through toml_fail(), or another code (-ENOMEM).
 * Anything after a header or a value (other than a comment) is refused only once its callback
 * returned 0.
 */
struct toml_handler {
    toml_table_cb table;
    toml_key_cb key;
    toml_value_cb value;
};

/*
 * Reads text[0..len) (not NUL-terminated; a leading UTF-8 byte order mark is skipped), calling h's
 * callbacks with ctx. Returns 0; -EINVAL with err (required) filled; -ENOMEM; or the negative
 * code a callback returned.
 */
int toml_parse(const char *text, size_t len, const struct toml_handler *h, void *ctx,
               struct toml_error *err);

/*
 * From a callback: fills the parse's error with the line being read, the column of at (a pointer
 * into that line, such as a callback's name or value->at) and the formatted message.
 * Returns -EINVAL for the callback to return.
 */
__attribute__((format(printf, 3, 4))) int toml_fail(struct toml_reader *r, const char *at,
                                                    const char *fmt, ...);

/* From a callback: the 1-based number of the line being read. */
int toml_line(const struct toml_reader *r);

/* Whether the n bytes at s are word: how callbacks compare the names they are handed. */
bool toml_name_is(const char *s, size_t n, const char *word);

/*
 * Parses a TOML integer from s[0..n) into v (type TOML_INTEGER, mag, neg, overflow): an optional
 * sign, then decimal or an unsigned 0x/0o, with _ only between digits. legacy_octal also takes
 * "0660" as octal the way chmod users write it, which TOML forbids (config.c allows it in
 * environment values). Returns NULL, or why s is not an integer, as a clause for a message.
 */
const char *toml_int_parse(const char *s, size_t n, bool legacy_octal, struct toml_value *v);

/*
 * Writes s as a TOML basic string: in double quotes, with every character toml_parse() would
 * not take raw escaped.
 */
void toml_write_string(FILE *out, const char *s);

#endif
