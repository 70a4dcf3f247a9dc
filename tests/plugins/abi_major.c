/* Broken test plugin: claims ABI major + 1 (a future, incompatible layout): the loader must refuse. */
#include "m1c/plugin.h"

static const m1c_attention_vtable vt = {.size = sizeof(m1c_attention_vtable)};

M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h);
M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h) {
    static const m1c_plugin_desc desc = {
        .abi_major = M1C_ABI_MAJOR + 1, .abi_minor = 0, .size = sizeof(m1c_plugin_desc),
        .kind = M1C_KIND_ATTENTION, .name = "abi_major", .version = "0", .description = "ABI major + 1",
        .license = "MIT", .vtable = &vt, .vtable_size = sizeof(m1c_attention_vtable)};
    return &desc;
}
