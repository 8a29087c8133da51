/*
 * libFuzzer target: message validation. Each decoded frame goes through
 * ingest_message(), the agent's MLflow validation into batch events, with a
 * writer that is never connected: batches the ingest cuts are handed back at
 * once as at shutdown. Rejections are counted through the error callback.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <uv.h>

#include "config.h"
#include "ingest.h"
#include "trackd_proto.h"
#include "writer.h"

static struct {
    bool ready;
    uv_loop_t loop;
    struct trackd_config cfg;
    struct writer writer;
    struct ingest ingest;
} F;

static void on_pause(void *ctx, bool pause)
{
    (void)ctx, (void)pause;
}
static void on_flushed(void *ctx, uint32_t conn, uint64_t seq)
{
    (void)ctx, (void)conn, (void)seq;
}
static void on_error(void *ctx, uint32_t conn, uint64_t seq, uint32_t code, const char *msg)
{
    (void)ctx, (void)conn, (void)seq, (void)code;
    if (strlen(msg) == 0)
        __builtin_trap(); /* every rejection names its reason */
}
static void on_released(void *ctx, uint64_t lsn)
{
    (void)ctx, (void)lsn;
}
static void w_reject(void *ctx, const struct batch *b, const struct ev *ev, uint32_t code,
                     const char *msg)
{
    (void)ctx, (void)b, (void)ev, (void)code, (void)msg;
}
static void w_done(void *ctx, struct batch *b)
{
    ingest_batch_done(ctx, b);
}

static void setup(void)
{
    uv_loop_init(&F.loop);
    struct config_error err;
    if (config_init(&F.cfg) != 0 || config_load_string(&F.cfg, "", 0, "fuzz", &err) != 0)
        __builtin_trap();
    struct writer_cbs wcbs = {w_reject, w_done, NULL, NULL};
    writer_init(&F.writer, &F.loop, &F.cfg, &wcbs, &F.ingest);
    F.writer.state = W_CLOSING; /* never connects: submitted batches come straight back */
    struct ingest_cbs icbs = {on_pause, on_flushed, on_error, on_released};
    ingest_init(&F.ingest, &F.loop, &F.cfg, &F.writer, &icbs, NULL);
    F.ready = true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!F.ready)
        setup();
    /* A client with a peer every other input, so batches carry both kinds. */
    static const struct peer peer = {1000, 1, {500}};
    struct ingest_origin o = {1,
                              "fuzzer",
                              "fuzz.py",
                              "LOCAL",
                              size && (data[0] & 1),
                              0,
                              size && (data[0] & 2) ? &peer : NULL};
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
                ingest_message(&F.ingest, &o, &m);
        }
    }
    proto_reader_free(&r);
    ingest_cut(&F.ingest); /* hands the open batch back, so nothing grows across inputs */
    return 0;
}
