/* Small core utilities: error formatting, checked allocation, paths. */
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int m1c_fail(m1c_err *e, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return M1C_ERR;
}

static void *oom(size_t n) {
    fprintf(stderr, "m1c: out of memory (%zu bytes)\n", n);
    abort();
}

void *m1c_xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    return p ? p : oom(n);
}

void *m1c_xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    return p ? p : oom(n * size);
}

void *m1c_xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    return q ? q : oom(n);
}

char *m1c_xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(m1c_xmalloc(n), s, n);
}

char *m1c_xasprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *s = m1c_xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

char *m1c_dirname(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return m1c_xstrdup(".");
    if (slash == path) return m1c_xstrdup("/");
    size_t n = (size_t)(slash - path);
    char *d = m1c_xmalloc(n + 1);
    memcpy(d, path, n);
    d[n] = 0;
    return d;
}

char *m1c_path_join(const char *dir, const char *rel) {
    if (rel[0] == '/' || !dir || !dir[0]) return m1c_xstrdup(rel);
    size_t n = strlen(dir);
    return m1c_xasprintf("%s%s%s", dir, (n && dir[n - 1] == '/') ? "" : "/", rel);
}

int m1c_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}
