/*
 * A small training loop logging through libtrackd: the shape of a real job
 * (params, per-step loss and accuracy, a report file as an artifact, an end
 * status) without a framework.
 * Usage: trackd-example [--experiment NAME] [--steps N] [--socket PATH]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trackd.h"

int main(int argc, char **argv)
{
    const char *experiment = "trackd-demo";
    const char *socket = NULL;
    long steps = 2000;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--experiment") == 0)
            experiment = argv[i + 1];
        else if (strcmp(argv[i], "--steps") == 0)
            steps = strtol(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--socket") == 0)
            socket = argv[i + 1];
    }
    trackd_client *c;
    struct trackd_options opts = {.socket_path = socket};
    int rc = trackd_open(&c, &opts);
    if (rc != 0) {
        fprintf(stderr, "trackd_open: %s\n", trackd_strerror(rc));
        return 1;
    }
    char run[TRACKD_RUN_ID_SIZE];
    trackd_new_run_id(run);
    struct trackd_kv tags[] = {{"model", "mlp"}, {"dataset", "synthetic"}};
    trackd_start_run(c, run, experiment, NULL, TRACKD_NOW, tags, 2);
    struct trackd_kv params[] = {
        {"learning_rate", "0.01"}, {"batch_size", "64"}, {"optimizer", "sgd"}, {"steps", "2000"}};
    trackd_log_params(c, run, params, 4);

    double loss = 2.5;
    for (long step = 0; step < steps; step++) {
        loss = loss * 0.998 + 0.002 * (0.1 + 0.05 * sin((double)step / 25.0));
        struct trackd_metric m[] = {
            {"train/loss", loss, step, TRACKD_NOW},
            {"train/accuracy", 1.0 - loss / 2.6, step, TRACKD_NOW},
        };
        trackd_log_metrics(c, run, m, 2);
        if (step % 100 == 99)
            trackd_log_metric(c, run, "val/loss", loss * 1.1, step, TRACKD_NOW);
    }
    /* A report as an artifact: the file may go right after the call, the agent holds it. */
    char dir[] = "/tmp/trackd-example-XXXXXX", report[64];
    if (mkdtemp(dir) != NULL) {
        snprintf(report, sizeof report, "%s/summary.txt", dir);
        FILE *f = fopen(report, "w");
        if (f != NULL) {
            fprintf(f, "steps %ld\nfinal train/loss %.6f\n", steps, loss);
            fclose(f);
            rc = trackd_log_artifact(c, run, report, "reports");
            if (rc != 0)
                fprintf(stderr, "trackd_log_artifact: %s\n", trackd_strerror(rc));
            unlink(report);
        }
        rmdir(dir);
    }
    trackd_end_run(c, run, "FINISHED", TRACKD_NOW);
    rc = trackd_flush(c, 30000);
    struct trackd_counters ctr;
    trackd_get_counters(c, &ctr);
    struct trackd_error err;
    while (trackd_next_error(c, &err))
        fprintf(stderr, "agent reported: %s\n", err.message);
    printf("run %s: %llu events sent, %llu dropped, %llu errors; flush %s\n", run,
           (unsigned long long)ctr.sent, (unsigned long long)ctr.dropped,
           (unsigned long long)ctr.errors, rc == 0 ? "committed" : trackd_strerror(rc));
    trackd_close(c, 5000);
    return rc == 0 && ctr.errors == 0 ? 0 : 1;
}
