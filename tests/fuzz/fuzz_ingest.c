/*
 * libFuzzer target: MLflow's rules for client messages. Each decoded frame goes through
 * events_from_message() (agent/events.c) into a batch of its own, whose statement inputs the
 * writer's builder then makes (batch_sql_build), as for a real range. No loop, no writer.
 * Every rejection must name its reason.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "batch.h"
#include "config.h"
#include "events.h"
#include "trackd_proto.h"
#include "validate.h"

static struct {
    bool ready;
    struct trackd_config cfg;
    uint64_t serial;
} F;

static void on_error(void *ctx, uint32_t conn, uint64_t seq, uint32_t code, const char *msg)
{
    (void)ctx, (void)conn, (void)seq, (void)code;
    if (strlen(msg) == 0)
        __builtin_trap(); /* every rejection names its reason */
}

static void setup(void)
{
    struct config_error err;
    if (config_init(&F.cfg) != 0 || config_load_string(&F.cfg, "", 0, "fuzz", &err) != 0)
        __builtin_trap();
    F.serial = 1;
    F.ready = true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!F.ready)
        setup();
    /* A client with a peer every other input, so batches carry both kinds. */
    static const struct peer peer = {1000, 1, {500}};
    struct events_origin o = {1,
                              "fuzzer",
                              "fuzz.py",
                              "LOCAL",
                              size && (data[0] & 1),
                              0,
                              size && (data[0] & 2) ? &peer : NULL};
    struct batch b;
    batch_init(&b);
    struct events_sink s = {&F.cfg, &b, 0, &F.serial, on_error, NULL};
    if (o.peer != NULL && (s.peer = batch_peer(&b, o.peer, o.user)) == 0)
        __builtin_trap();
    struct proto_reader r;
    proto_reader_init(&r, 1u << 20);
    uint8_t *space;
    size_t n;
    if (size && proto_reader_space(&r, size, &space, &n) == 0) {
        memcpy(space, data, size);
        proto_reader_commit(&r, size);
        struct proto_header h;
        const uint8_t *body;
        while (proto_reader_next(&r, &h, &body) == 1) {
            struct proto_msg m;
            if (proto_msg_decode(&h, body, &m) == 0)
                events_from_message(&s, &o, &m);
        }
    }
    proto_reader_free(&r);
    struct batch_sql sql;
    batch_sql_init(&sql);
    /* A short tags.value (MLflow before 2.17) on odd inputs: values are cut, never split. */
    unsigned tag_max = size && (data[0] & 4) ? 5000 : VALIDATE_TAG_VALUE_MAX;
    if (batch_sql_build(&b, 0, b.n, tag_max, &sql) != 0 && b.n > 0)
        __builtin_trap(); /* only out of memory may fail, and inputs here are small */
    batch_sql_free(&sql);
    batch_free(&b);
    return 0;
}
