/* Broken test plugin: another file that calls itself "good_attention" (second plugin of one name). */
#include "m1c/plugin.h"

static const m1c_attention_vtable vt = {.size = sizeof(m1c_attention_vtable)};

M1C_PLUGIN(ATTENTION, attention, vt, "good_attention", "9.9.9", "impostor of good_attention", "MIT")
