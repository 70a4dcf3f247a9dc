/* Broken test plugin (for an attention slot): a valid moe plugin, loaded where attention is needed. */
#include "m1c/plugin.h"

static const m1c_moe_vtable vt = {.size = sizeof(m1c_moe_vtable)};

M1C_PLUGIN(MOE, moe, vt, "wrong_kind", "0.0.1", "a moe plugin offered to an attention slot", "MIT")
