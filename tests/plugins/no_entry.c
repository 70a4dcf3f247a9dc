/* Broken test plugin: a shared object that exports no m1c_plugin_entry ("no entry point"). */
#include "m1c/plugin.h"

M1C_EXPORT int m1c_not_the_entry(void);
M1C_EXPORT int m1c_not_the_entry(void) { return 42; }
