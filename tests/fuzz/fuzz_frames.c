/*
 * libFuzzer target: the agent's frame reader and message decoder. The input
 * is a byte stream as a client would send it, fed to the reader in chunks
 * whose sizes come from the input itself; every complete frame is decoded and
 * its lists iterated to the end. Nothing may crash, read out of bounds, leak,
 * or loop without consuming input.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "trackd_proto.h"

static void walk(const struct proto_msg *m)
{
    struct proto_iter it;
    struct proto_kv kv;
    struct proto_point p;
    switch (m->kind) {
    case PROTO_METRICS:
        it = m->u.metrics.points;
        while (proto_iter_next_point(&it, &p))
            ;
        break;
    case PROTO_PARAMS:
    case PROTO_TAGS:
        it = m->u.kvs.kvs;
        while (proto_iter_next_kv(&it, &kv))
            ;
        break;
    case PROTO_START_RUN:
        it = m->u.start_run.tags;
        while (proto_iter_next_kv(&it, &kv))
            ;
        break;
    case PROTO_STATS_REPLY: {
        struct proto_str name;
        uint64_t v;
        it = m->u.stats.pairs;
        while (proto_iter_next_stat(&it, &name, &v))
            ;
        break;
    }
    default: break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct proto_reader r;
    proto_reader_init(&r, 1u << 20);
    size_t pos = 0;
    unsigned chunk = size ? data[0] % 64 + 1 : 1;
    while (pos < size) {
        uint8_t *space;
        size_t n;
        if (proto_reader_space(&r, 1, &space, &n) != 0)
            break;
        size_t take = size - pos < chunk ? size - pos : chunk;
        if (take > n)
            take = n;
        memcpy(space, data + pos, take);
        proto_reader_commit(&r, take);
        pos += take;
        struct proto_header h;
        const uint8_t *body;
        int rc;
        while ((rc = proto_reader_next(&r, &h, &body)) == 1) {
            struct proto_msg m;
            if (proto_msg_decode(&h, body, &m) == 0)
                walk(&m);
        }
        if (rc < 0)
            break; /* the agent closes such a connection */
    }
    proto_reader_free(&r);
    return 0;
}
