/* Logging with levels, to stderr. The level is the core's one piece of process-wide state. */
#ifndef M1C_LOG_H
#define M1C_LOG_H

#include <stdarg.h>
#include "m1c/plugin.h"

void m1c_log_set_level(int level); /* m1c_log_level; M1C_LOG env var overrides at start-up */
int m1c_log_get_level(void);
void m1c_log(int level, const char *fmt, ...) M1C_PRINTF(2, 3);
void m1c_logv(int level, const char *prefix, const char *fmt, va_list ap);

#define M1C_ERROR(...) m1c_log(M1C_LOG_ERROR, __VA_ARGS__)
#define M1C_WARN(...) m1c_log(M1C_LOG_WARN, __VA_ARGS__)
#define M1C_INFO(...) m1c_log(M1C_LOG_INFO, __VA_ARGS__)
#define M1C_DEBUG(...) m1c_log(M1C_LOG_DEBUG, __VA_ARGS__)

#endif
