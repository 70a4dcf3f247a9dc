/* Commands whose engines arrive with later work (model assembly, HF interop): each parses its
 * options and --help already, and says plainly that this build cannot run it yet. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static int pending(int argc, char **argv, const char *usage) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            return 0;
        }
    return m1c_cli_error("%s: not available in this build yet", argv[0]);
}

int m1c_cmd_logits(int argc, char **argv) {
    return pending(argc, argv, "usage: m1c logits (--checkpoint DIR | --hf DIR) --input IDS.npy --output OUT.npy\n");
}
int m1c_cmd_ablate(int argc, char **argv) {
    return pending(argc, argv, "usage: m1c ablate CONFIG --grid key=v1,v2 ...\n");
}
