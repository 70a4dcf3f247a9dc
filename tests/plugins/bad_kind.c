/* Broken test plugin: a kind number the core does not know. */
#include "m1c/plugin.h"

static const m1c_attention_vtable vt = {.size = sizeof(m1c_attention_vtable)};

M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h);
M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h) {
    static const m1c_plugin_desc desc = {
        .abi_major = M1C_ABI_MAJOR, .abi_minor = M1C_ABI_MINOR, .size = sizeof(m1c_plugin_desc),
        .kind = 99, .name = "bad_kind", .version = "0", .description = "unknown kind",
        .license = "MIT", .vtable = &vt, .vtable_size = sizeof(m1c_attention_vtable)};
    return &desc;
}
