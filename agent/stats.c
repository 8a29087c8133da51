/*
 * Counter storage and the name table `trackd stats` prints from.
 */
#include "stats.h"

#include <string.h>

struct stats stats;

static const char *const names[] = {
#define STATS_NAME(name) #name,
    STATS_COUNTERS(STATS_NAME)
#undef STATS_NAME
};

size_t stats_count(void)
{
    return sizeof names / sizeof names[0];
}

const char *const *stats_names(void)
{
    return names;
}

void stats_values(uint64_t *values_out)
{
    memcpy(values_out, &stats, sizeof stats);
}
