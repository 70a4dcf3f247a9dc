/* Small core utilities: error reporting, checked allocation, strings and paths. */
#ifndef M1C_UTIL_H
#define M1C_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include "m1c/plugin.h"

/* Every fallible core function takes an m1c_err and returns M1C_OK or M1C_ERR; the message is one
 * line that names the file, line, key or plugin (the CLI prints it and exits non-zero). */
typedef struct m1c_err {
    char msg[1024];
} m1c_err;

/* Format into e->msg (when e is not NULL); returns M1C_ERR. */
int m1c_fail(m1c_err *e, const char *fmt, ...) M1C_PRINTF(2, 3);

/* Allocation that aborts with a message on failure: only for small bookkeeping, never model-sized
 * buffers (those go through arenas and report errors). */
void *m1c_xmalloc(size_t n);
void *m1c_xcalloc(size_t n, size_t size);
void *m1c_xrealloc(void *p, size_t n);
char *m1c_xstrdup(const char *s);
char *m1c_xasprintf(const char *fmt, ...) M1C_PRINTF(1, 2);

/* Directory part of a path ("." if none), newly allocated. */
char *m1c_dirname(const char *path);
/* dir/rel, or rel itself when absolute; newly allocated. */
char *m1c_path_join(const char *dir, const char *rel);
int m1c_file_exists(const char *path);

/* A file written atomically: bytes go to "<path>.tmp.<pid>", which commit fsyncs and renames over
 * path (then syncs the folder), so a failure or crash never leaves a partial file at path. Writes
 * after an error are ignored and reported by commit; abort (or a failed commit) removes the
 * temporary file. */
typedef struct m1c_afile {
    char *path, *tmp;
    int fd, err; /* err: errno of the first failed write, 0 if none */
} m1c_afile;
int m1c_afile_open(m1c_afile *f, const char *path, m1c_err *e);
void m1c_afile_write(m1c_afile *f, const void *buf, size_t n);
int m1c_afile_commit(m1c_afile *f, m1c_err *e);
void m1c_afile_abort(m1c_afile *f);

#endif
