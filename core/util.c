/* Small core utilities: error formatting, checked allocation, paths. */
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

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

int m1c_afile_open(m1c_afile *f, const char *path, m1c_err *e) {
    f->path = m1c_xstrdup(path);
    f->tmp = m1c_xasprintf("%s.tmp.%ld", path, (long)getpid());
    f->err = 0;
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        int rc = m1c_fail(e, "%s: cannot create %s: %s", path, f->tmp, strerror(errno));
        free(f->path), free(f->tmp);
        f->path = f->tmp = NULL;
        return rc;
    }
    return M1C_OK;
}

void m1c_afile_write(m1c_afile *f, const void *buf, size_t n) {
    const char *p = buf;
    while (n && !f->err) {
        ssize_t k = write(f->fd, p, n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) f->err = k < 0 ? errno : EIO;
        else p += k, n -= (size_t)k;
    }
}

void m1c_afile_abort(m1c_afile *f) {
    if (f->fd >= 0) close(f->fd);
    if (f->tmp) unlink(f->tmp);
    free(f->path), free(f->tmp);
    f->path = f->tmp = NULL;
    f->fd = -1;
}

int m1c_afile_commit(m1c_afile *f, m1c_err *e) {
    if (!f->err && fsync(f->fd) != 0) f->err = errno;
    if (close(f->fd) != 0 && !f->err) f->err = errno;
    f->fd = -1;
    int rc = f->err ? m1c_fail(e, "%s: cannot write %s: %s", f->path, f->tmp, strerror(f->err)) : M1C_OK;
    if (!rc && rename(f->tmp, f->path) != 0)
        rc = m1c_fail(e, "%s: cannot rename %s to it: %s", f->path, f->tmp, strerror(errno));
    if (rc) {
        m1c_afile_abort(f);
        return rc;
    }
    /* Best effort: make the rename itself durable (some file systems refuse fsync on folders). */
    char *dir = m1c_dirname(f->path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
    free(f->path), free(f->tmp);
    f->path = f->tmp = NULL;
    return M1C_OK;
}
