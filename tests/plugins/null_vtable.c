/* Broken test plugin: a descriptor whose vtable pointer is NULL. */
#include "m1c/plugin.h"

M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h);
M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h) {
    static const m1c_plugin_desc desc = {
        .abi_major = M1C_ABI_MAJOR, .abi_minor = M1C_ABI_MINOR, .size = sizeof(m1c_plugin_desc),
        .kind = M1C_KIND_ATTENTION, .name = "null_vtable", .version = "0", .description = "no vtable",
        .license = "MIT", .vtable = NULL, .vtable_size = sizeof(m1c_attention_vtable)};
    return &desc;
}
