/* Strict configuration on top of libconfig 1.5: typed getters that fill in defaults, read tracking so
 * that unknown keys (typos) are refused with file:line, `-s key=value` overrides, and a writer that
 * prints the resolved configuration with floats that round-trip. */
#include "config.h"

#include <errno.h>
#include <libconfig.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* One record per libconfig setting the program has looked at, hung on the setting's hook. Records
 * are owned by the config (linked through `next`) so m1c_settings pointers stay valid until
 * m1c_config_free. */
struct m1c_settings {
    config_setting_t *cs;
    m1c_config *cfg;
    char *path;         /* full key path, built on first use */
    const char *origin; /* the override that set this value ("a.b=3"), or NULL */
    int read;           /* some reader asked for this key */
    m1c_settings *next;
};

struct m1c_config {
    config_t lc;
    char *name; /* file name as given (messages) */
    char *dir;  /* @include and relative paths resolve against it */
    m1c_settings *recs;
    char **strs; /* owned strings: override texts, display names of included files */
    int n_strs, cap_strs;
    char last_error[1024]; /* the last settings error (see m1c_config_last_error) */
};

static char *own(m1c_config *c, char *s) {
    if (c->n_strs == c->cap_strs) {
        c->cap_strs = c->cap_strs ? 2 * c->cap_strs : 16;
        c->strs = m1c_xrealloc(c->strs, (size_t)c->cap_strs * sizeof *c->strs);
    }
    return c->strs[c->n_strs++] = s;
}

static m1c_settings *rec(m1c_config *c, config_setting_t *cs) {
    if (cs->hook) return cs->hook;
    m1c_settings *r = m1c_xcalloc(1, sizeof *r);
    r->cs = cs;
    r->cfg = c;
    r->next = c->recs;
    c->recs = r;
    config_setting_set_hook(cs, r);
    return r;
}

static void mark_read(m1c_config *c, config_setting_t *cs) { rec(c, cs)->read = 1; }

/* ---- paths and locations -------------------------------------------------------------------- */

static const char *path_of(m1c_config *c, config_setting_t *cs) {
    m1c_settings *r = rec(c, cs);
    if (r->path) return r->path;
    config_setting_t *p = config_setting_parent(cs);
    if (!p) return r->path = m1c_xstrdup("");
    const char *pp = path_of(c, p);
    const char *sep = pp[0] ? "." : "";
    if (cs->name)
        r->path = m1c_xasprintf("%s%s%s", pp, sep, cs->name);
    else
        r->path = m1c_xasprintf("%s%s[%d]", pp, sep, config_setting_index(cs));
    return r->path;
}

/* "path.key" for key of group s (key alone at the root). */
static void key_path(char *buf, size_t n, m1c_settings *s, const char *key) {
    const char *p = path_of(s->cfg, s->cs);
    snprintf(buf, n, "%s%s%s", p, p[0] ? "." : "", key);
}

/* The file a setting was read from, as the user can open it: included files are named relative to
 * the include directory by libconfig, so they are joined with it. */
static const char *file_of(m1c_config *c, const config_setting_t *cs) {
    if (!cs->file) return c->name;
    if (!strcmp(c->dir, ".") || cs->file[0] == '/') return cs->file;
    char *j = m1c_path_join(c->dir, cs->file);
    for (int i = 0; i < c->n_strs; i++)
        if (!strcmp(c->strs[i], j)) {
            free(j);
            return c->strs[i];
        }
    return own(c, j);
}

/* "file:line" of a setting, or "override 'a.b=c'" when an override set it; settings created by the
 * program (defaults, line 0) take their nearest ancestor's location. */
static void where(char *buf, size_t n, m1c_config *c, const config_setting_t *cs) {
    for (const config_setting_t *x = cs; x; x = config_setting_parent(x)) {
        const m1c_settings *r = x->hook;
        if (r && r->origin) {
            snprintf(buf, n, "override '%s'", r->origin);
            return;
        }
        if (x->line > 0) {
            snprintf(buf, n, "%s:%u", file_of(c, x), x->line);
            return;
        }
    }
    snprintf(buf, n, "%s", c->name);
}

static const char *type_name(int type) {
    switch (type) {
    case CONFIG_TYPE_GROUP: return "a group";
    case CONFIG_TYPE_INT:
    case CONFIG_TYPE_INT64: return "an integer";
    case CONFIG_TYPE_FLOAT: return "a number";
    case CONFIG_TYPE_STRING: return "a string";
    case CONFIG_TYPE_BOOL: return "a boolean";
    case CONFIG_TYPE_ARRAY: return "an array";
    case CONFIG_TYPE_LIST: return "a list";
    default: return "nothing";
    }
}

/* Shortest %g that reads back to the same double, with a '.' or exponent so it stays a float. */
static void fmt_float(char *buf, size_t n, double v) {
    for (int prec = 6; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    if (isfinite(v) && !strpbrk(buf, ".eE")) strncat(buf, ".0", n - strlen(buf) - 1);
}

/* The value of a setting as a message shows it. */
static void fmt_value(char *buf, size_t n, const config_setting_t *cs) {
    switch (cs->type) {
    case CONFIG_TYPE_INT: snprintf(buf, n, "%d", cs->value.ival); break;
    case CONFIG_TYPE_INT64: snprintf(buf, n, "%lld", cs->value.llval); break;
    case CONFIG_TYPE_FLOAT: fmt_float(buf, n, cs->value.fval); break;
    case CONFIG_TYPE_STRING: snprintf(buf, n, "\"%s\"", cs->value.sval ? cs->value.sval : ""); break;
    case CONFIG_TYPE_BOOL: snprintf(buf, n, "%s", cs->value.ival ? "true" : "false"); break;
    default: snprintf(buf, n, "%s", type_name(cs->type)); break;
    }
}

/* Error about key of s (key NULL: about s itself; idx >= 0: element idx of the list key). */
static int vfail_at(m1c_err *e, m1c_settings *s, const char *key, int idx, const char *fmt, va_list ap) {
    char loc[256], path[256], msg[480]; /* together below last_error's 1024: no truncation */
    config_setting_t *x = key ? config_setting_get_member(s->cs, key) : s->cs;
    if (x && idx >= 0 && config_setting_is_aggregate(x) && idx < config_setting_length(x))
        x = config_setting_get_elem(x, (unsigned)idx);
    where(loc, sizeof loc, s->cfg, x ? x : s->cs);
    if (key) {
        key_path(path, sizeof path, s, key);
        if (idx >= 0) {
            size_t l = strlen(path);
            snprintf(path + l, sizeof path - l, ".[%d]", idx);
        }
    } else {
        snprintf(path, sizeof path, "%s", path_of(s->cfg, s->cs));
    }
    vsnprintf(msg, sizeof msg, fmt, ap);
    m1c_config *c = s->cfg;
    snprintf(c->last_error, sizeof c->last_error, "%s: %s: %s", loc, path[0] ? path : "(root)", msg);
    return m1c_fail(e, "%s", c->last_error);
}

const char *m1c_config_last_error(const m1c_config *c) { return c->last_error; }

int m1c_cfg_fail(m1c_settings *s, const char *key, int idx, m1c_err *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail_at(e, s, key, idx, fmt, ap);
    va_end(ap);
    return M1C_ERR;
}

void m1c_cfg_where(const m1c_settings *s, const char *key, char *buf, size_t n) {
    m1c_settings *m = (m1c_settings *)s;
    config_setting_t *x = key ? config_setting_get_member(m->cs, key) : NULL;
    where(buf, n, m->cfg, x ? x : m->cs);
}

/* ---- suggestions for typos ------------------------------------------------------------------ */

static int edit_distance(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na > 63 || nb > 63) return 99;
    int d[64][64];
    for (size_t i = 0; i <= na; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= nb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= na; i++)
        for (size_t j = 1; j <= nb; j++) {
            int sub = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            int del = d[i - 1][j] + 1, ins = d[i][j - 1] + 1;
            int m = sub < del ? sub : del;
            d[i][j] = m < ins ? m : ins;
            /* adjacent transposition counts as one edit */
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < d[i][j])
                d[i][j] = d[i - 2][j - 2] + 1;
        }
    return d[na][nb];
}

/* Close enough to be a typo of each other: at most a third of the letters differ (at least one). */
static int close_to(const char *typo, const char *known) {
    int lim = (int)strlen(known) / 3;
    if (lim < 1) lim = 1;
    return edit_distance(typo, known) <= lim;
}

/* ---- loading -------------------------------------------------------------------------------- */

/* libconfig 1.5 reads an integer literal past 32 bits without the L suffix modulo 2^32, silently
 * (seed = 5000000000 becomes 705032704). Refuse such literals in the text before libconfig sees it
 * (included files are not scanned: their integers need the L suffix too, docs/config.md says so). */
static int name_char(char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '*' ||
           ch == '.';
}

static int check_big_ints(const char *t, const char *name, m1c_err *e) {
    int line = 1;
    for (const char *p = t; *p;) {
        if (*p == '\n') {
            line++, p++;
        } else if (*p == '"') { /* string: skip to the closing quote */
            for (p++; *p && *p != '"'; p++) {
                if (*p == '\\' && p[1]) p++;
                if (*p == '\n') line++;
            }
            if (*p) p++;
        } else if (*p == '#' || (*p == '/' && p[1] == '/')) {
            while (*p && *p != '\n') p++;
        } else if (*p == '/' && p[1] == '*') {
            for (p += 2; *p && !(*p == '*' && p[1] == '/'); p++)
                if (*p == '\n') line++;
            if (*p) p += 2;
        } else if (*p >= '0' && *p <= '9' && !(p > t && name_char(p[-1])) &&
                   !(p > t + 1 && p[-1] == '-' && name_char(p[-2]))) { /* a number, not part of a key name */
            const char *q = p;
            int hex = q[0] == '0' && (q[1] == 'x' || q[1] == 'X');
            if (hex) q += 2;
            while ((*q >= '0' && *q <= '9') || (hex && ((*q >= 'a' && *q <= 'f') || (*q >= 'A' && *q <= 'F')))) q++;
            int is_float = !hex && (*q == '.' || *q == 'e' || *q == 'E');
            if (!is_float && *q != 'L' && *q != 'l') {
                errno = 0;
                unsigned long long v = strtoull(p, NULL, hex ? 16 : 10);
                int neg = p > t && p[-1] == '-';
                if (errno == ERANGE || (hex ? v > 0xFFFFFFFFull : v > (neg ? 2147483648ull : 2147483647ull)))
                    return m1c_fail(e, "%s:%d: integer %s%.*s does not fit 32 bits: write it with the L suffix (%s%.*sL)",
                                    name, line, neg ? "-" : "", (int)(q - p), p, neg ? "-" : "", (int)(q - p), p);
            }
            while ((*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') || *q == '.' ||
                   ((*q == '-' || *q == '+') && (q[-1] == 'e' || q[-1] == 'E')))
                q++;
            p = q;
        } else {
            p++;
        }
    }
    return M1C_OK;
}

static int apply_override(m1c_config *c, const char *ov, m1c_err *e);

int m1c_config_parse(m1c_config **out, const char *text, const char *name, const char *dir,
                     const char *const *overrides, int n_overrides, m1c_err *e) {
    *out = NULL;
    m1c_config *c = m1c_xcalloc(1, sizeof *c);
    config_init(&c->lc);
    c->name = m1c_xstrdup(name ? name : "<string>");
    c->dir = m1c_xstrdup(dir && dir[0] ? dir : ".");
    config_set_include_dir(&c->lc, c->dir);
    if (check_big_ints(text, c->name, e)) {
        m1c_config_free(c);
        return M1C_ERR;
    }
    if (!config_read_string(&c->lc, text)) {
        const char *f = config_error_file(&c->lc);
        char *fn = f ? (strcmp(c->dir, ".") && f[0] != '/' ? m1c_path_join(c->dir, f) : m1c_xstrdup(f)) : NULL;
        m1c_fail(e, "%s:%d: %s", fn ? fn : c->name, config_error_line(&c->lc), config_error_text(&c->lc));
        free(fn);
        m1c_config_free(c);
        return M1C_ERR;
    }
    for (int i = 0; i < n_overrides; i++)
        if (apply_override(c, overrides[i], e)) {
            m1c_config_free(c);
            return M1C_ERR;
        }
    *out = c;
    return M1C_OK;
}

int m1c_config_load(m1c_config **out, const char *path, const char *const *overrides, int n_overrides,
                    m1c_err *e) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return m1c_fail(e, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 14, n = 0;
    char *text = m1c_xmalloc(cap);
    for (;;) {
        n += fread(text + n, 1, cap - n - 1, f);
        if (n < cap - 1) break;
        cap *= 2;
        text = m1c_xrealloc(text, cap);
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(text);
        return m1c_fail(e, "%s: read error", path);
    }
    text[n] = 0;
    char *dir = m1c_dirname(path);
    int rc = m1c_config_parse(out, text, path, dir, overrides, n_overrides, e);
    free(dir);
    free(text);
    return rc;
}

void m1c_config_free(m1c_config *c) {
    if (!c) return;
    config_destroy(&c->lc);
    for (m1c_settings *r = c->recs, *nx; r; r = nx) {
        nx = r->next;
        free(r->path);
        free(r);
    }
    for (int i = 0; i < c->n_strs; i++) free(c->strs[i]);
    free(c->strs);
    free(c->name);
    free(c->dir);
    free(c);
}

const char *m1c_config_file(const m1c_config *c) { return c->name; }
const char *m1c_config_dir(const m1c_config *c) { return c->dir; }
m1c_settings *m1c_config_root(m1c_config *c) {
    m1c_settings *r = rec(c, config_root_setting(&c->lc));
    r->read = 1;
    return r;
}

/* ---- overrides ------------------------------------------------------------------------------ */

/* A value class: settings of the same class may replace each other. */
static int value_class(int type) {
    switch (type) {
    case CONFIG_TYPE_INT:
    case CONFIG_TYPE_INT64:
    case CONFIG_TYPE_FLOAT: return 1;
    case CONFIG_TYPE_LIST:
    case CONFIG_TYPE_ARRAY: return 2;
    default: return 10 + type;
    }
}

static int copy_value(config_setting_t *dst, const config_setting_t *src);

/* Add a copy of src under parent (name NULL in lists). */
static config_setting_t *copy_new(config_setting_t *parent, const char *name, const config_setting_t *src) {
    config_setting_t *d = config_setting_add(parent, name, src->type);
    if (!d) return NULL;
    return copy_value(d, src) ? NULL : d;
}

/* Make dst (same class as src) hold src's value, keeping dst itself (pointers to it stay valid). */
static int copy_value(config_setting_t *dst, const config_setting_t *src) {
    switch (src->type) {
    case CONFIG_TYPE_INT:
    case CONFIG_TYPE_INT64:
    case CONFIG_TYPE_FLOAT:
        if (dst->type == CONFIG_TYPE_FLOAT && src->type != CONFIG_TYPE_FLOAT) {
            /* an integer where a float stands: stays a float (3 -> 3.0) */
            dst->value.fval = src->type == CONFIG_TYPE_INT ? (double)src->value.ival : (double)src->value.llval;
        } else {
            dst->type = src->type;
            dst->value = src->value;
        }
        return M1C_OK;
    case CONFIG_TYPE_BOOL: return config_setting_set_bool(dst, src->value.ival) ? M1C_OK : M1C_ERR;
    case CONFIG_TYPE_STRING: return config_setting_set_string(dst, src->value.sval) ? M1C_OK : M1C_ERR;
    default: break;
    }
    /* aggregates: empty dst, then copy every element */
    while (config_setting_length(dst) > 0) config_setting_remove_elem(dst, 0);
    if (dst->type != src->type) dst->type = src->type; /* list <-> array, both empty now */
    for (int i = 0; i < config_setting_length(src); i++) {
        const config_setting_t *x = config_setting_get_elem(src, (unsigned)i);
        if (!copy_new(dst, src->type == CONFIG_TYPE_GROUP ? x->name : NULL, x)) return M1C_ERR;
    }
    return M1C_OK;
}

static void set_origin(m1c_config *c, config_setting_t *cs, const char *origin) {
    rec(c, cs)->origin = origin;
    if (config_setting_is_aggregate(cs))
        for (int i = 0; i < config_setting_length(cs); i++)
            set_origin(c, config_setting_get_elem(cs, (unsigned)i), origin);
}

/* "12", "[3]": a list index; -1 otherwise. */
static int parse_index(const char *comp) {
    const char *p = comp;
    int bracket = *p == '[';
    if (bracket) p++;
    if (*p < '0' || *p > '9') return -1;
    char *end;
    long v = strtol(p, &end, 10);
    if (bracket && *end++ != ']') return -1;
    return (*end || v > 1 << 30) ? -1 : (int)v;
}

/* Parse an override's value into a one-setting libconfig document `v`. Integers are parsed here
 * (libconfig 1.5 silently truncates integers past 32 bits without an L suffix); everything libconfig
 * cannot read as a value is a bare-word string, unless it starts like a quoted string or a list. */
static int parse_override_value(config_t *tmp, const char *val, const char *ov, m1c_err *e) {
    config_init(tmp);
    char *end;
    errno = 0;
    const char *digits = val + (*val == '-' || *val == '+');
    int hex = digits[0] == '0' && (digits[1] == 'x' || digits[1] == 'X');
    long long iv = strtoll(val, &end, hex ? 16 : 10); /* base 10 even with a leading 0, as libconfig */
    if (*val && !*end && errno == 0 && strchr("+-0123456789", *val)) {
        config_setting_t *v = config_setting_add(config_root_setting(tmp), "v",
                                                 iv >= INT32_MIN && iv <= INT32_MAX ? CONFIG_TYPE_INT
                                                                                    : CONFIG_TYPE_INT64);
        if (v->type == CONFIG_TYPE_INT)
            config_setting_set_int(v, (int)iv);
        else
            config_setting_set_int64(v, iv);
        return M1C_OK;
    }
    char *doc = m1c_xasprintf("v = %s;", val);
    int ok = config_read_string(tmp, doc);
    free(doc);
    if (ok && config_setting_length(config_root_setting(tmp)) == 1 && config_lookup(tmp, "v")) return M1C_OK;
    if (*val && strchr("\"[({", *val))
        return m1c_fail(e, "override '%s': cannot parse the value%s%s", ov, ok ? "" : ": ",
                        ok ? "" : config_error_text(tmp));
    config_destroy(tmp);
    config_init(tmp);
    config_setting_t *v = config_setting_add(config_root_setting(tmp), "v", CONFIG_TYPE_STRING);
    config_setting_set_string(v, val);
    return M1C_OK;
}

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = 0;
    return s;
}

static int apply_override(m1c_config *c, const char *ov_in, m1c_err *e) {
    const char *ov = own(c, m1c_xstrdup(ov_in));
    const char *eq = strchr(ov, '=');
    if (!eq) return m1c_fail(e, "override '%s': expected key=value", ov);
    char *keybuf = m1c_xstrdup(ov);
    keybuf[eq - ov] = 0;
    char *key = trim(keybuf);
    char *valbuf = m1c_xstrdup(eq + 1);
    char *val = trim(valbuf);
    config_t tmp;
    int rc = M1C_ERR;
    if (!key[0]) {
        m1c_fail(e, "override '%s': empty key", ov);
        free(keybuf);
        free(valbuf);
        return M1C_ERR;
    }
    if (parse_override_value(&tmp, val, ov, e)) goto done;
    const config_setting_t *v = config_lookup(&tmp, "v");

    /* Split the key into components: "a.b.[0].c", "a.b.0.c" and "a.b[0].c" all work. */
    for (char *p = key; *p; p++)
        if (*p == '[' && p > key && p[-1] != '.') {
            memmove(p + 1, p, strlen(p) + 1);
            *p++ = '.';
        }
    config_setting_t *cur = config_root_setting(&c->lc);
    char *save = NULL;
    char *comp = strtok_r(key, ".", &save);
    while (comp) {
        char *next = strtok_r(NULL, ".", &save);
        int idx = parse_index(comp);
        config_setting_t *x = NULL;
        if (config_setting_is_group(cur)) {
            if (idx >= 0) {
                m1c_fail(e, "override '%s': '%s' is a group, not a list", ov, path_of(c, cur));
                goto done;
            }
            x = config_setting_get_member(cur, comp);
        } else if (config_setting_is_list(cur) || config_setting_is_array(cur)) {
            if (idx < 0) {
                m1c_fail(e, "override '%s': '%s' is a list: expected an index, got '%s'", ov, path_of(c, cur), comp);
                goto done;
            }
            if (idx >= config_setting_length(cur)) {
                m1c_fail(e, "override '%s': index %d is past the end of '%s' (%d elements)", ov, idx, path_of(c, cur),
                         config_setting_length(cur));
                goto done;
            }
            x = config_setting_get_elem(cur, (unsigned)idx);
        } else {
            m1c_fail(e, "override '%s': '%s' is %s, not a group", ov, path_of(c, cur), type_name(cur->type));
            goto done;
        }
        if (next) {
            if (!x) {
                x = config_setting_add(cur, comp, CONFIG_TYPE_GROUP);
                if (!x) {
                    m1c_fail(e, "override '%s': invalid key name '%s'", ov, comp);
                    goto done;
                }
                rec(c, x)->origin = ov;
            }
            cur = x;
        } else if (!x) {
            x = copy_new(cur, comp, v);
            if (!x) {
                m1c_fail(e, "override '%s': invalid key name '%s'", ov, comp);
                goto done;
            }
            set_origin(c, x, ov);
        } else {
            if (value_class(x->type) != value_class(v->type)) {
                char loc[512];
                where(loc, sizeof loc, c, x);
                m1c_fail(e, "override '%s': %s is %s (%s), the override gives %s", ov, path_of(c, x),
                         type_name(x->type), loc, type_name(v->type));
                goto done;
            }
            if (copy_value(x, v)) {
                m1c_fail(e, "override '%s': cannot store the value in '%s'", ov, path_of(c, x));
                goto done;
            }
            set_origin(c, x, ov);
        }
        comp = next;
    }
    rc = M1C_OK;
done:
    config_destroy(&tmp);
    free(keybuf);
    free(valbuf);
    return rc;
}

/* ---- writing -------------------------------------------------------------------------------- */

static void write_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; s && *s; s++) {
        unsigned char ch = (unsigned char)*s;
        switch (ch) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\t': fputs("\\t", f); break;
        case '\r': fputs("\\r", f); break;
        case '\f': fputs("\\f", f); break;
        default:
            if (ch < 0x20)
                fprintf(f, "\\x%02x", ch);
            else
                fputc(ch, f);
        }
    }
    fputc('"', f);
}

static void write_value(FILE *f, const config_setting_t *cs, int indent);

static void write_members(FILE *f, const config_setting_t *g, int indent) {
    for (int i = 0; i < config_setting_length(g); i++) {
        const config_setting_t *x = config_setting_get_elem(g, (unsigned)i);
        fprintf(f, "%*s%s = ", indent, "", x->name);
        write_value(f, x, indent);
        fputs(";\n", f);
    }
}

static void write_value(FILE *f, const config_setting_t *cs, int indent) {
    char buf[64];
    switch (cs->type) {
    case CONFIG_TYPE_INT:
        if (cs->format == CONFIG_FORMAT_HEX)
            fprintf(f, "0x%X", (unsigned)cs->value.ival);
        else
            fprintf(f, "%d", cs->value.ival);
        break;
    case CONFIG_TYPE_INT64: fprintf(f, "%lldL", cs->value.llval); break;
    case CONFIG_TYPE_FLOAT:
        fmt_float(buf, sizeof buf, cs->value.fval);
        fputs(buf, f);
        break;
    case CONFIG_TYPE_BOOL: fputs(cs->value.ival ? "true" : "false", f); break;
    case CONFIG_TYPE_STRING: write_string(f, cs->value.sval); break;
    case CONFIG_TYPE_GROUP:
        fputs("{\n", f);
        write_members(f, cs, indent + 2);
        fprintf(f, "%*s}", indent, "");
        break;
    case CONFIG_TYPE_ARRAY:
    case CONFIG_TYPE_LIST: {
        int n = config_setting_length(cs), multiline = 0;
        for (int i = 0; i < n; i++)
            if (config_setting_is_aggregate(config_setting_get_elem(cs, (unsigned)i))) multiline = 1;
        fputc(cs->type == CONFIG_TYPE_ARRAY ? '[' : '(', f);
        for (int i = 0; i < n; i++) {
            if (multiline) fprintf(f, "\n%*s", indent + 2, "");
            else fputc(' ', f);
            write_value(f, config_setting_get_elem(cs, (unsigned)i), indent + 2);
            if (i + 1 < n) fputc(',', f);
        }
        if (multiline) fprintf(f, "\n%*s", indent, "");
        else if (n) fputc(' ', f);
        fputc(cs->type == CONFIG_TYPE_ARRAY ? ']' : ')', f);
        break;
    }
    default: break;
    }
}

int m1c_config_write(m1c_config *c, FILE *f) {
    write_members(f, config_root_setting(&c->lc), 0);
    return ferror(f) ? M1C_ERR : M1C_OK;
}

/* ---- groups and lists ----------------------------------------------------------------------- */

static config_setting_t *member(m1c_settings *s, const char *key) {
    return config_setting_is_group(s->cs) ? config_setting_get_member(s->cs, key) : NULL;
}

static int missing(m1c_settings *s, const char *key, m1c_err *e) {
    return m1c_cfg_fail(s, key, -1, e, "required key is missing");
}

static int wrong_type(m1c_settings *s, const char *key, int idx, const config_setting_t *x, const char *want,
                      m1c_err *e) {
    char got[256];
    fmt_value(got, sizeof got, x);
    return m1c_cfg_fail(s, key, idx, e, "expected %s, got %s", want, got);
}

/* Add key to group s with the given type (defaults fill in); the new setting counts as read. */
static config_setting_t *add_default(m1c_settings *s, const char *key, int type) {
    if (!config_setting_is_group(s->cs)) return NULL;
    config_setting_t *x = config_setting_add(s->cs, key, type);
    if (x) mark_read(s->cfg, x);
    return x;
}

m1c_settings *m1c_cfg_group(m1c_settings *s, const char *key, int required, m1c_err *e) {
    config_setting_t *x = member(s, key);
    if (!x) {
        if (required) {
            missing(s, key, e);
            return NULL;
        }
        x = add_default(s, key, CONFIG_TYPE_GROUP);
        if (!x) {
            m1c_cfg_fail(s, key, -1, e, "cannot add a group here");
            return NULL;
        }
    }
    mark_read(s->cfg, x);
    if (!config_setting_is_group(x)) {
        wrong_type(s, key, -1, x, "a group { ... }", e);
        return NULL;
    }
    return rec(s->cfg, x);
}

int m1c_cfg_len(m1c_settings *s, const char *key) {
    config_setting_t *x = member(s, key);
    if (!x) return -1;
    mark_read(s->cfg, x);
    /* a single value stands for a list of one ("files = \"a.txt\"" reads like ["a.txt"]) */
    if (config_setting_is_list(x) || config_setting_is_array(x)) return config_setting_length(x);
    return 1;
}

/* Element i of list key (or the value itself for i == 0 when it is not a list); NULL if none. */
static config_setting_t *elem(m1c_settings *s, const char *key, int i) {
    config_setting_t *x = member(s, key);
    if (!x || i < 0) return NULL;
    mark_read(s->cfg, x);
    if (config_setting_is_list(x) || config_setting_is_array(x))
        return i < config_setting_length(x) ? config_setting_get_elem(x, (unsigned)i) : NULL;
    return i == 0 ? x : NULL;
}

m1c_settings *m1c_cfg_elem(m1c_settings *s, const char *key, int i) {
    config_setting_t *x = elem(s, key, i);
    if (!x || !config_setting_is_group(x)) return NULL;
    m1c_settings *r = rec(s->cfg, x);
    r->read = 1;
    return r;
}

int m1c_cfg_has(m1c_settings *s, const char *key) { return member(s, key) != NULL; }

int m1c_cfg_n_keys(const m1c_settings *s) { return config_setting_is_group(s->cs) ? config_setting_length(s->cs) : 0; }

const char *m1c_cfg_key(const m1c_settings *s, int i) {
    if (i < 0 || i >= m1c_cfg_n_keys(s)) return NULL;
    return config_setting_name(config_setting_get_elem(s->cs, (unsigned)i));
}

const char *m1c_cfg_path(const m1c_settings *s) { return path_of(s->cfg, s->cs); }

const char *m1c_cfg_file(const m1c_settings *s) {
    for (const config_setting_t *x = s->cs; x; x = config_setting_parent(x))
        if (x->line > 0) return file_of(s->cfg, x);
    return s->cfg->name;
}

int m1c_cfg_line(const m1c_settings *s) { return (int)s->cs->line; }

m1c_config *m1c_cfg_config(const m1c_settings *s) { return s->cfg; }

/* ---- typed getters -------------------------------------------------------------------------- */

static void int_range(char *buf, size_t n, int64_t lo, int64_t hi) {
    if (lo == INT64_MIN && hi == INT64_MAX)
        snprintf(buf, n, "an integer");
    else if (hi == INT64_MAX)
        snprintf(buf, n, "an integer >= %lld", (long long)lo);
    else if (lo == INT64_MIN)
        snprintf(buf, n, "an integer <= %lld", (long long)hi);
    else
        snprintf(buf, n, "an integer in [%lld, %lld]", (long long)lo, (long long)hi);
}

static int int_of(const config_setting_t *x, int64_t *v) {
    if (x->type == CONFIG_TYPE_INT) *v = x->value.ival;
    else if (x->type == CONFIG_TYPE_INT64) *v = x->value.llval;
    else return 0;
    return 1;
}

static int float_of(const config_setting_t *x, double *v) {
    int64_t i;
    if (x->type == CONFIG_TYPE_FLOAT) *v = x->value.fval;
    else if (int_of(x, &i)) *v = (double)i;
    else return 0;
    return 1;
}

int m1c_cfg_int(m1c_settings *s, const char *key, int req, int64_t def, int64_t lo, int64_t hi, int64_t *out,
                m1c_err *e) {
    char want[128];
    int_range(want, sizeof want, lo, hi);
    config_setting_t *x = member(s, key);
    if (!x) {
        if (req) return missing(s, key, e);
        int small = def >= INT32_MIN && def <= INT32_MAX;
        x = add_default(s, key, small ? CONFIG_TYPE_INT : CONFIG_TYPE_INT64);
        if (x && small) config_setting_set_int(x, (int)def);
        else if (x) config_setting_set_int64(x, def);
        *out = def;
        return M1C_OK;
    }
    mark_read(s->cfg, x);
    int64_t v;
    if (!int_of(x, &v) || v < lo || v > hi) return wrong_type(s, key, -1, x, want, e);
    *out = v;
    return M1C_OK;
}

static void float_range(char *buf, size_t n, double lo, double hi) {
    int nolo = lo <= -HUGE_VAL || lo <= -1.7e308, nohi = hi >= HUGE_VAL || hi >= 1.7e308;
    char a[40], b[40];
    fmt_float(a, sizeof a, lo);
    fmt_float(b, sizeof b, hi);
    if (nolo && nohi) snprintf(buf, n, "a number");
    else if (nohi) snprintf(buf, n, "a number >= %s", a);
    else if (nolo) snprintf(buf, n, "a number <= %s", b);
    else snprintf(buf, n, "a number in [%s, %s]", a, b);
}

int m1c_cfg_float(m1c_settings *s, const char *key, int req, double def, double lo, double hi, double *out,
                  m1c_err *e) {
    char want[128];
    float_range(want, sizeof want, lo, hi);
    config_setting_t *x = member(s, key);
    if (!x) {
        if (req) return missing(s, key, e);
        x = add_default(s, key, CONFIG_TYPE_FLOAT);
        if (x) config_setting_set_float(x, def);
        *out = def;
        return M1C_OK;
    }
    mark_read(s->cfg, x);
    double v;
    if (!float_of(x, &v) || !(v >= lo && v <= hi)) return wrong_type(s, key, -1, x, want, e);
    *out = v;
    return M1C_OK;
}

int m1c_cfg_bool(m1c_settings *s, const char *key, int req, int def, int *out, m1c_err *e) {
    config_setting_t *x = member(s, key);
    if (!x) {
        if (req) return missing(s, key, e);
        x = add_default(s, key, CONFIG_TYPE_BOOL);
        if (x) config_setting_set_bool(x, def);
        *out = def != 0;
        return M1C_OK;
    }
    mark_read(s->cfg, x);
    if (x->type != CONFIG_TYPE_BOOL) return wrong_type(s, key, -1, x, "true or false", e);
    *out = x->value.ival != 0;
    return M1C_OK;
}

static int check_choice(m1c_settings *s, const char *key, int idx, const char *v, const char *const *choices,
                        m1c_err *e) {
    if (!choices) return M1C_OK;
    for (int i = 0; choices[i]; i++)
        if (!strcmp(v, choices[i])) return M1C_OK;
    char list[512] = "", hint[128] = "";
    size_t n = 0;
    for (int i = 0; choices[i] && n < sizeof list; i++) {
        n += (size_t)snprintf(list + n, sizeof list - n, "%s\"%s\"", i ? ", " : "", choices[i]);
        if (!hint[0] && close_to(v, choices[i])) snprintf(hint, sizeof hint, " (did you mean \"%s\"?)", choices[i]);
    }
    return m1c_cfg_fail(s, key, idx, e, "expected one of %s, got \"%s\"%s", list, v, hint);
}

int m1c_cfg_string(m1c_settings *s, const char *key, int req, const char *def, const char *const *choices,
                   const char **out, m1c_err *e) {
    config_setting_t *x = member(s, key);
    if (!x) {
        if (req) return missing(s, key, e);
        *out = NULL;
        if (!def) return M1C_OK; /* no default: absent stays absent */
        x = add_default(s, key, CONFIG_TYPE_STRING);
        if (!x) {
            *out = def;
            return M1C_OK;
        }
        config_setting_set_string(x, def);
        *out = config_setting_get_string(x);
        return M1C_OK;
    }
    mark_read(s->cfg, x);
    if (x->type != CONFIG_TYPE_STRING) return wrong_type(s, key, -1, x, "a string", e);
    if (check_choice(s, key, -1, x->value.sval, choices, e)) return M1C_ERR;
    *out = x->value.sval;
    return M1C_OK;
}

/* Element i of a list key, with the errors every list getter shares. */
static config_setting_t *list_elem(m1c_settings *s, const char *key, int i, m1c_err *e) {
    config_setting_t *x = member(s, key);
    if (!x) {
        missing(s, key, e);
        return NULL;
    }
    config_setting_t *el = elem(s, key, i);
    if (!el) {
        int n = m1c_cfg_len(s, key);
        m1c_cfg_fail(s, key, -1, e, "element %d asked for, the list has %d", i, n);
    }
    return el;
}

int m1c_cfg_list_string(m1c_settings *s, const char *key, int i, const char **out, m1c_err *e) {
    config_setting_t *el = list_elem(s, key, i, e);
    if (!el) return M1C_ERR;
    if (el->type != CONFIG_TYPE_STRING) return wrong_type(s, key, i, el, "a string", e);
    *out = el->value.sval;
    return M1C_OK;
}

int m1c_cfg_list_int(m1c_settings *s, const char *key, int i, int64_t *out, m1c_err *e) {
    config_setting_t *el = list_elem(s, key, i, e);
    if (!el) return M1C_ERR;
    if (!int_of(el, out)) return wrong_type(s, key, i, el, "an integer", e);
    return M1C_OK;
}

int m1c_cfg_list_float(m1c_settings *s, const char *key, int i, double *out, m1c_err *e) {
    config_setting_t *el = list_elem(s, key, i, e);
    if (!el) return M1C_ERR;
    if (!float_of(el, out)) return wrong_type(s, key, i, el, "a number", e);
    return M1C_OK;
}

int m1c_cfg_list_string_choice(m1c_settings *s, const char *key, int i, const char *const *choices,
                               const char **out, m1c_err *e) {
    if (m1c_cfg_list_string(s, key, i, out, e)) return M1C_ERR;
    return check_choice(s, key, i, *out, choices, e);
}

void m1c_cfg_touch(m1c_settings *s, const char *key) {
    config_setting_t *x = member(s, key);
    if (x) mark_read(s->cfg, x);
}

int m1c_cfg_done(m1c_settings *s, m1c_err *e) {
    if (!config_setting_is_group(s->cs)) return M1C_OK;
    int n = config_setting_length(s->cs);
    for (int i = 0; i < n; i++) {
        config_setting_t *x = config_setting_get_elem(s->cs, (unsigned)i);
        const m1c_settings *r = x->hook;
        if (r && r->read) continue;
        /* suggest the closest key that was read here (defaults filled in count: they are known) */
        const char *best = NULL;
        int best_d = 1 << 30;
        for (int j = 0; j < n; j++) {
            config_setting_t *y = config_setting_get_elem(s->cs, (unsigned)j);
            const m1c_settings *ry = y->hook;
            if (!ry || !ry->read || !close_to(x->name, y->name)) continue;
            int d = edit_distance(x->name, y->name);
            if (d < best_d) best_d = d, best = y->name;
        }
        if (best) return m1c_cfg_fail(s, x->name, -1, e, "unknown key (did you mean '%s'?)", best);
        return m1c_cfg_fail(s, x->name, -1, e, "unknown key");
    }
    return M1C_OK;
}

static int done_all(m1c_config *c, config_setting_t *cs, m1c_err *e) {
    if (config_setting_is_group(cs) && m1c_cfg_done(rec(c, cs), e)) return M1C_ERR;
    if (config_setting_is_group(cs) || config_setting_is_list(cs))
        for (int i = 0; i < config_setting_length(cs); i++)
            if (done_all(c, config_setting_get_elem(cs, (unsigned)i), e)) return M1C_ERR;
    return M1C_OK;
}

int m1c_cfg_done_all(m1c_settings *s, m1c_err *e) { return done_all(s->cfg, s->cs, e); }
