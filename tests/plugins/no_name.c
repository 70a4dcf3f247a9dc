/* Broken test plugin: a descriptor with an empty name. */
#include "m1c/plugin.h"

static const m1c_attention_vtable vt = {.size = sizeof(m1c_attention_vtable)};

M1C_PLUGIN(ATTENTION, attention, vt, "", "0", "nameless", "MIT")
