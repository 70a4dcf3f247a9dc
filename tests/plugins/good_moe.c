/* Test plugin: a minimal valid MoE-kind plugin (identity feed-forward), used by wrong_kind.c's test
 * as the "any valid moe descriptor" and to check that kind 0 slots accept every kind. */
#include "m1c/plugin.h"

/* Only the descriptor is exercised: the functions are never called by the loader tests. */
static const m1c_moe_vtable vt = {.size = sizeof(m1c_moe_vtable)};

M1C_PLUGIN(MOE, moe, vt, "good_moe", "0.0.1", "descriptor-only moe plugin (loader test)", "MIT")
