/* Broken test plugin: declares a vtable smaller than ABI 1.0's (a truncated or corrupt descriptor). */
#include "m1c/plugin.h"

static const m1c_attention_vtable vt = {.size = 8};

M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h);
M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h) {
    static const m1c_plugin_desc desc = {
        .abi_major = M1C_ABI_MAJOR, .abi_minor = M1C_ABI_MINOR, .size = sizeof(m1c_plugin_desc),
        .kind = M1C_KIND_ATTENTION, .name = "small_vtable", .version = "0", .description = "vtable too small",
        .license = "MIT", .vtable = &vt, .vtable_size = 8};
    return &desc;
}
