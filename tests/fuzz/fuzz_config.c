/*
 * libFuzzer target: the agent's TOML configuration parser. Any text must
 * either load or fail with a message naming a line; a loaded configuration
 * must print (config_dump) and be freed without leaks.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct trackd_config c;
    struct config_error err = {0};
    if (config_init(&c) != 0)
        return 0;
    int rc = config_load_string(&c, (const char *)data, size, "fuzz.toml", &err);
    if (rc == 0) {
        FILE *f = fopen("/dev/null", "w");
        if (f) {
            config_dump(&c, f);
            fclose(f);
        }
    } else if (rc == -EINVAL && err.message[0] == '\0') {
        __builtin_trap(); /* a refusal always says why */
    }
    config_free(&c);
    return 0;
}
