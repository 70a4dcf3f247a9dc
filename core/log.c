/* Logging with levels to stderr. The level is process-wide core state, set once by the CLI. */
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int log_level = -1; /* -1: not yet read from M1C_LOG */

static int level_from_env(void) {
    const char *s = getenv("M1C_LOG");
    if (!s) return M1C_LOG_INFO;
    if (!strcmp(s, "error")) return M1C_LOG_ERROR;
    if (!strcmp(s, "warn")) return M1C_LOG_WARN;
    if (!strcmp(s, "debug")) return M1C_LOG_DEBUG;
    return M1C_LOG_INFO;
}

void m1c_log_set_level(int level) { log_level = level; }

int m1c_log_get_level(void) {
    if (log_level < 0) log_level = level_from_env();
    return log_level;
}

void m1c_logv(int level, const char *prefix, const char *fmt, va_list ap) {
    static const char *const names[] = {"error", "warning", "info", "debug"};
    if (level > m1c_log_get_level()) return;
    char line[2048];
    vsnprintf(line, sizeof line, fmt, ap);
    if (level <= M1C_LOG_WARN)
        fprintf(stderr, "m1c: %s: %s%s%s\n", names[level], prefix ? prefix : "", prefix ? ": " : "", line);
    else
        fprintf(stderr, "%s%s%s\n", prefix ? prefix : "", prefix ? ": " : "", line);
}

void m1c_log(int level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    m1c_logv(level, NULL, fmt, ap);
    va_end(ap);
}
