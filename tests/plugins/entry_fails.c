/* Broken test plugin: the entry point refuses (h->error + NULL), e.g. a missing device feature. */
#include "m1c/plugin.h"

M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h);
M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h) {
    h->error(h, "needs feature %s which this core lacks", "warp-drive");
    return NULL;
}
