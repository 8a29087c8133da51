/*
 * toml — the TOML subset of agent.toml, read in one bounded pass, line by line: anything we do not
 * understand is an error with line and column, because a silently ignored setting is worse than a
 * daemon that refuses to start. Tables, keys and values go to the caller's callbacks as they are
 * read; what they mean (which keys exist, their types and ranges) is config.c's business.
 */
#include "toml.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* Returns the value of the hex digit c, or 16 when c is none. */
static unsigned digit_value(unsigned char c)
{
    if (isdigit(c))
        return (unsigned)(c - '0');
    return isxdigit(c) ? (unsigned)(tolower(c) - 'a' + 10) : 16;
}

bool toml_name_is(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && memcmp(s, word, n) == 0;
}

/* v->overflow reports digits beyond 64 bits, which every key's range rejects anyway. */
const char *toml_int_parse(const char *s, size_t n, bool legacy_octal, struct toml_value *v)
{
    unsigned base = 10;
    bool prev_digit = false;

    v->type = TOML_INTEGER;
    v->mag = 0;
    v->neg = v->overflow = false;
    if (n > 0 && (*s == '+' || *s == '-')) {
        v->neg = *s == '-';
        if (n >= 3 && s[1] == '0' && (s[2] == 'x' || s[2] == 'o'))
            return "a sign is not allowed before 0x or 0o";
        s++, n--;
    }
    if (n >= 2 && s[0] == '0' && s[1] == 'b')
        return "binary integers are not supported";
    if (n >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'o')) {
        base = s[1] == 'x' ? 16 : 8;
        s += 2, n -= 2;
    } else if (n >= 2 && s[0] == '0') {
        if (!legacy_octal)
            return "leading zeros are not allowed (write octal with 0o, as in 0o660)";
        base = 8;
    }
    if (n == 0)
        return "it has no digits";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        unsigned d = digit_value(c);
        if (c == '_') {
            if (!prev_digit || i + 1 == n)
                return "underscores must sit between digits";
            prev_digit = false;
            continue;
        }
        if (d >= base)
            return base == 8 ? "it has a character that is not an octal digit"
                             : "it has a character that is not a digit";
        if (v->mag > (UINT64_MAX - d) / base)
            v->overflow = true;
        else
            v->mag = v->mag * base + d;
        prev_digit = true;
    }
    return NULL;
}

/* Returns the length of the valid UTF-8 sequence at s, or 0 for an invalid one. */
static size_t utf8_len(const char *str, const char *end)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t n;
    uint32_t cp, min;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF)
        n = 2, cp = s[0] & 0x1Fu, min = 0x80;
    else if ((s[0] & 0xF0) == 0xE0)
        n = 3, cp = s[0] & 0x0Fu, min = 0x800;
    else if (s[0] >= 0xF0 && s[0] <= 0xF4)
        n = 4, cp = s[0] & 0x07u, min = 0x10000;
    else
        return 0;
    if ((size_t)(end - str) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static size_t utf8_encode(uint32_t cp, char *out)
{
    size_t n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    static const unsigned char lead[] = {0, 0x00, 0xC0, 0xE0, 0xF0};

    for (size_t i = n - 1; i > 0; i--, cp >>= 6)
        out[i] = (char)(0x80 | (cp & 0x3F));
    out[0] = (char)(lead[n] | cp);
    return n;
}

/* TOML forbids raw control characters everywhere except tab. */
static bool is_control(unsigned char c)
{
    return (c < 0x20 && c != '\t') || c == 0x7F;
}

/* ---- reader ---- */

struct toml_reader {
    const struct toml_handler *h;
    void *ctx;
    const char *pos, *end;  /* unparsed text */
    const char *line, *eol; /* current line, eol before any "\r\n" */
    int lineno;
    struct toml_error *err;
    char *decoded; /* TOML_MAX_LINE + 1 bytes: a string's text is never longer than its line */
};

int toml_fail(struct toml_reader *r, const char *at, const char *fmt, ...)
{
    va_list ap;
    int column = 1;

    /* Columns count characters so editors and humans agree on them. */
    for (const char *s = r->line; s < at; s++)
        if (((unsigned char)*s & 0xC0) != 0x80)
            column++;
    r->err->line = r->lineno;
    r->err->column = column;
    va_start(ap, fmt);
    vsnprintf(r->err->message, sizeof r->err->message, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

int toml_line(const struct toml_reader *r)
{
    return r->lineno;
}

static const char *skip_ws(const char *s, const char *end)
{
    while (s < end && (*s == ' ' || *s == '\t'))
        s++;
    return s;
}

static const char *skip_bare(const char *s, const char *end)
{
    while (s < end && (isalnum((unsigned char)*s) || *s == '_' || *s == '-'))
        s++;
    return s;
}

static int check_comment(struct toml_reader *r, const char *s)
{
    while (s < r->eol) {
        size_t n;
        if (is_control((unsigned char)*s))
            return toml_fail(r, s, "control character U+%04X is not allowed in a comment",
                             (unsigned char)*s);
        if ((n = utf8_len(s, r->eol)) == 0)
            return toml_fail(r, s, "comment contains invalid UTF-8");
        s += n;
    }
    return 0;
}

/* After a header or value only blanks and a comment may follow. */
static int parse_line_end(struct toml_reader *r, const char *s, const char *what)
{
    s = skip_ws(s, r->eol);
    if (s == r->eol)
        return 0;
    if (*s == '#')
        return check_comment(r, s);
    return toml_fail(r, s, "unexpected text after %s", what);
}

static int parse_header(struct toml_reader *r, const char *open)
{
    const char *name, *s = open + 1;
    int len, rc;

    if (s < r->eol && *s == '[')
        return toml_fail(r, open, "arrays of tables ([[...]]) are not supported");
    name = skip_ws(s, r->eol);
    s = skip_bare(name, r->eol);
    len = (int)(s - name);
    if (len == 0) {
        if (s < r->eol && (*s == '"' || *s == '\''))
            return toml_fail(r, s, "quoted section names are not supported");
        return toml_fail(r, s, "expected a section name after \"[\"");
    }
    s = skip_ws(s, r->eol);
    if (s < r->eol && *s == '.')
        return toml_fail(r, s, "dotted section names are not supported");
    if (s == r->eol || *s != ']')
        return toml_fail(r, s, "expected \"]\" after the section name");
    rc = r->h->table(r->ctx, r, open, name, (size_t)len);
    return rc ? rc : parse_line_end(r, s + 1, "the section header");
}

/*
 * Parses a \uXXXX or \UXXXXXXXX escape whose backslash is at esc into r->decoded at *n.
 * Returns the first byte after it, or NULL after reporting the error.
 */
static const char *parse_unicode(struct toml_reader *r, const char *esc, size_t *n)
{
    unsigned digits = esc[1] == 'u' ? 4 : 8;
    const char *s = esc + 2;
    uint32_t cp = 0;

    for (unsigned i = 0; i < digits; i++, s++) {
        if (s == r->eol || digit_value((unsigned char)*s) == 16) {
            toml_fail(r, esc, "escape \"\\%c\" needs %u hex digits", esc[1], digits);
            return NULL;
        }
        cp = cp << 4 | digit_value((unsigned char)*s);
    }
    if (cp == 0) {
        toml_fail(r, esc, "NUL characters are not allowed in strings");
        return NULL;
    }
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        toml_fail(r, esc, "escape \"%.*s\" is not a Unicode scalar value", (int)(s - esc), esc);
        return NULL;
    }
    *n += utf8_encode(cp, r->decoded + *n);
    return s;
}

/* Parses "..." (escapes, UTF-8) or '...' (verbatim) starting at the opening quote. */
static int parse_string(struct toml_reader *r, const char *open, struct toml_value *v)
{
    static const char escapes[] = "\"\"\\\\n\nt\tr\rb\bf\f";
    const char *s = open + 1, *e;
    char *out = r->decoded;
    size_t n = 0, len;

    for (;;) {
        unsigned char c;
        if (s == r->eol || (*s == '\\' && *open == '"' && s + 1 == r->eol))
            return toml_fail(r, open, "string is missing its closing quote");
        c = (unsigned char)*s;
        if (c == (unsigned char)*open)
            break;
        if (c == '\\' && *open == '"') {
            if (s[1] == 'u' || s[1] == 'U') {
                if ((s = parse_unicode(r, s, &n)) == NULL)
                    return -EINVAL;
                continue;
            }
            /* escapes[] pairs each escape letter with its byte; search only the letters. */
            for (e = escapes; *e && *e != s[1]; e += 2)
                ;
            if (*e) {
                out[n++] = e[1];
                s += 2;
                continue;
            }
            if (isgraph((unsigned char)s[1]))
                return toml_fail(r, s, "invalid escape \"\\%c\" in string", s[1]);
            return toml_fail(r, s, "invalid escape in string");
        }
        if (is_control(c))
            return toml_fail(r, s, "control character U+%04X must be escaped in a string", c);
        if ((len = utf8_len(s, r->eol)) == 0)
            return toml_fail(r, s, "string contains invalid UTF-8");
        memcpy(out + n, s, len);
        n += len;
        s += len;
    }
    out[n] = '\0';
    v->type = TOML_STRING;
    v->str = out;
    v->len = n;
    v->end = s + 1;
    return 0;
}

/*
 * Parses a value starting at s. Unsupported TOML forms are recognised by their first characters so
 * the message names what the user wrote instead of a generic syntax error.
 */
static int parse_value(struct toml_reader *r, const char *s, struct toml_value *v)
{
    const char *t = s, *body = s;
    size_t n, bn;
    const char *why;

    if (s == r->eol || *s == '#')
        return toml_fail(r, s, "expected a value after \"=\"");
    if (r->eol - s >= 3 && (*s == '"' || *s == '\'') && s[1] == *s && s[2] == *s)
        return toml_fail(r, s, "multi-line strings are not supported");
    if (*s == '"' || *s == '\'')
        return parse_string(r, s, v);
    if (*s == '[')
        return toml_fail(r, s, "arrays are not supported");
    if (*s == '{')
        return toml_fail(r, s, "inline tables are not supported");

    while (t < r->eol && (isalnum((unsigned char)*t) || (*t && strchr("_+-.:", *t))))
        t++;
    n = (size_t)(t - s);
    v->end = t;
    if (toml_name_is(s, n, "true") || toml_name_is(s, n, "false")) {
        v->type = TOML_BOOL;
        v->mag = toml_name_is(s, n, "true");
        return 0;
    }
    if (n > 0 && (*s == '+' || *s == '-'))
        body++;
    bn = n - (size_t)(body - s);
    if (toml_name_is(body, bn, "inf") || toml_name_is(body, bn, "nan"))
        return toml_fail(r, s, "floats are not supported");
    if (bn == 0 || !isdigit((unsigned char)*body))
        return toml_fail(r, s, "expected a value: a quoted string, an integer, true or false");
    if (memchr(s, ':', n) ||
        (n >= 5 && body == s && isdigit((unsigned char)s[1]) && isdigit((unsigned char)s[2]) &&
         isdigit((unsigned char)s[3]) && s[4] == '-'))
        return toml_fail(r, s, "dates and times are not supported");
    if (!(bn > 1 && body[0] == '0' && body[1] == 'x') &&
        (memchr(s, '.', n) || memchr(s, 'e', n) || memchr(s, 'E', n)))
        return toml_fail(r, s, "floats are not supported");
    if ((why = toml_int_parse(s, n, false, v)) == NULL)
        return 0;
    return toml_fail(r, s, "\"%.*s\" is not a valid integer: %s", (int)(n < 64 ? n : 64), s, why);
}

static int parse_keyval(struct toml_reader *r, const char *key)
{
    const char *s = skip_bare(key, r->eol);
    int klen = (int)(s - key), rc;
    struct toml_value v = {0};

    if (klen == 0 && s < r->eol && (*s == '"' || *s == '\''))
        return toml_fail(r, s, "quoted keys are not supported");
    s = skip_ws(s, r->eol);
    if (klen > 0 && s < r->eol && *s == '.')
        return toml_fail(r, s, "dotted keys are not supported");
    if (klen == 0 || s == r->eol || *s != '=')
        return toml_fail(r, key, "expected \"key = value\"");
    if ((rc = r->h->key(r->ctx, r, key, (size_t)klen)) != 0)
        return rc;
    v.at = skip_ws(s + 1, r->eol);
    if ((rc = parse_value(r, v.at, &v)) != 0 || (rc = r->h->value(r->ctx, r, &v)) != 0)
        return rc;
    return parse_line_end(r, v.end, "the value");
}

static int parse_text(struct toml_reader *r)
{
    /* Editors on some systems prepend a UTF-8 byte order mark; it carries no meaning. */
    if (r->end - r->pos >= 3 && memcmp(r->pos, "\xEF\xBB\xBF", 3) == 0)
        r->pos += 3;
    while (r->pos < r->end) {
        const char *nl = memchr(r->pos, '\n', (size_t)(r->end - r->pos)), *s;
        int rc = 0;

        r->lineno++;
        r->line = r->pos;
        r->eol = nl ? nl : r->end;
        r->pos = nl ? nl + 1 : r->end;
        if (r->eol > r->line && r->eol[-1] == '\r')
            r->eol--;
        if (r->eol - r->line > TOML_MAX_LINE)
            return toml_fail(r, r->line, "line is longer than %d bytes", TOML_MAX_LINE);
        s = skip_ws(r->line, r->eol);
        if (s == r->eol)
            continue;
        if (*s == '#')
            rc = check_comment(r, s);
        else if (*s == '[')
            rc = parse_header(r, s);
        else
            rc = parse_keyval(r, s);
        if (rc)
            return rc;
    }
    return 0;
}

int toml_parse(const char *text, size_t len, const struct toml_handler *h, void *ctx,
               struct toml_error *err)
{
    struct toml_reader r;
    int rc;

    memset(&r, 0, sizeof r);
    memset(err, 0, sizeof *err);
    r.h = h;
    r.ctx = ctx;
    r.pos = text;
    r.end = text + len;
    r.err = err;
    r.decoded = malloc(TOML_MAX_LINE + 1);
    if (!r.decoded)
        return -ENOMEM;
    rc = parse_text(&r);
    free(r.decoded);
    return rc;
}

/* ---- writer ---- */

void toml_write_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        switch (c) {
        case '"': fputs("\\\"", out); break;
        case '\\': fputs("\\\\", out); break;
        case '\n': fputs("\\n", out); break;
        case '\t': fputs("\\t", out); break;
        case '\r': fputs("\\r", out); break;
        default:
            if (is_control(c))
                fprintf(out, "\\u%04X", c);
            else
                fputc(c, out);
        }
    }
    fputc('"', out);
}
