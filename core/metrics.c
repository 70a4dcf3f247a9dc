/* JSON Lines metrics writer. */
#include "metrics.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int m1c_mkdirs(const char *path, m1c_err *e) {
    char *p = m1c_xstrdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0755) && errno != EEXIST) {
            m1c_fail(e, "%s: cannot create directory: %s", p, strerror(errno));
            free(p);
            return M1C_ERR;
        }
        *s = '/';
    }
    int rc = mkdir(p, 0755) && errno != EEXIST ? m1c_fail(e, "%s: cannot create directory: %s", p, strerror(errno))
                                               : M1C_OK;
    free(p);
    return rc;
}

int m1c_metrics_open(m1c_metrics *m, const char *path, m1c_err *e) {
    memset(m, 0, sizeof *m);
    char *dir = m1c_dirname(path);
    int rc = m1c_mkdirs(dir, e);
    free(dir);
    if (rc) return rc;
    m->f = fopen(path, "a");
    if (!m->f) return m1c_fail(e, "%s: cannot open for writing: %s", path, strerror(errno));
    m->path = m1c_xstrdup(path);
    return M1C_OK;
}

void m1c_metrics_close(m1c_metrics *m) {
    if (m->f) fclose(m->f);
    free(m->path);
    memset(m, 0, sizeof *m);
}

void m1c_metrics_write(m1c_metrics *m, const char *stage, int64_t step, const char *const *keys, const double *values,
                       int n) {
    if (!m->f) return;
    json_t *o = json_object();
    json_object_set_new(o, "stage", json_string(stage));
    json_object_set_new(o, "step", json_integer(step));
    for (int i = 0; i < n; i++)
        json_object_set_new(o, keys[i], isfinite(values[i]) ? json_real(values[i]) : json_null());
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    fprintf(m->f, "%s\n", s);
    fflush(m->f);
    free(s);
    json_decref(o);
}
