/*
 * Agent counters. Everything the agent accepts, writes, rejects or drops is
 * counted here, on the loop thread only (no atomics needed), and served to
 * `trackd stats` over the socket as a flat name -> integer list.
 */
#ifndef TRACKD_STATS_H
#define TRACKD_STATS_H

#include <stddef.h>
#include <stdint.h>

/* X-macro: one line per counter, so the struct and the names cannot drift. */
#define STATS_COUNTERS(X)                                                                          \
    X(connections_accepted)                                                                        \
    X(connections_current)                                                                         \
    X(connections_rejected)                                                                        \
    X(connections_refused_identity)                                                                \
    X(identity_overridden)                                                                         \
    X(user_lookups)                                                                                \
    X(user_lookup_waits)                                                                           \
    X(user_lookups_slow)                                                                           \
    X(user_lookup_timeouts)                                                                        \
    X(timeouts_hello)                                                                              \
    X(timeouts_frame)                                                                              \
    X(timeouts_idle)                                                                               \
    X(rate_limited)                                                                                \
    X(closed_slow_reader)                                                                          \
    X(closed_read_memory)                                                                          \
    X(closed_mid_frame)                                                                            \
    X(read_buffer_bytes)                                                                           \
    X(frames_received)                                                                             \
    X(bytes_received)                                                                              \
    X(events_received)                                                                             \
    X(events_committed)                                                                            \
    X(metrics_committed)                                                                           \
    X(params_committed)                                                                            \
    X(tags_committed)                                                                              \
    X(runs_committed)                                                                              \
    X(rejected_protocol)                                                                           \
    X(rejected_bad_utf8)                                                                           \
    X(rejected_bad_key)                                                                            \
    X(rejected_key_too_long)                                                                       \
    X(rejected_value_too_long)                                                                     \
    X(rejected_bad_run_id)                                                                         \
    X(rejected_bad_timestamp)                                                                      \
    X(rejected_bad_status)                                                                         \
    X(rejected_bad_name)                                                                           \
    X(rejected_param_changed)                                                                      \
    X(rejected_database)                                                                           \
    X(rejected_run_state)                                                                          \
    X(rejected_destination)                                                                        \
    X(rejected_not_owner)                                                                          \
    X(batches_committed)                                                                           \
    X(batches_failed)                                                                              \
    X(batch_splits)                                                                                \
    X(ranges_direct)                                                                               \
    X(direct_fallbacks)                                                                            \
    X(db_retries)                                                                                  \
    X(db_errors_class_08)                                                                          \
    X(db_errors_class_25)                                                                          \
    X(db_errors_class_40)                                                                          \
    X(db_errors_class_42)                                                                          \
    X(db_errors_class_53)                                                                          \
    X(db_errors_class_55)                                                                          \
    X(db_errors_class_57)                                                                          \
    X(db_errors_class_58)                                                                          \
    X(db_errors_class_XX)                                                                          \
    X(db_errors_other)                                                                             \
    X(db_connects)                                                                                 \
    X(db_connected)   /* 1 when any writer connection is up */                                     \
    X(db_connections) /* writer connections up */                                                  \
    X(db_schema_errors)                                                                            \
    X(db_rtt_us_last)                                                                              \
    X(db_rtt_us_max)                                                                               \
    X(queue_events)                                                                                \
    X(queue_bytes)                                                                                 \
    X(queue_bytes_peak)                                                                            \
    X(runs_routed)                                                                                 \
    X(runs_on_writers)                                                                             \
    X(runs_on_busiest_writer_peak)                                                                 \
    X(backpressure_pauses)                                                                         \
    X(duplicates_dropped)                                                                          \
    X(dead_lettered)                                                                               \
    X(journal_records)                                                                             \
    X(journal_blocks)                                                                              \
    X(journal_releases)                                                                            \
    X(journal_full)                                                                                \
    X(journal_write_errors)                                                                        \
    X(journal_bytes)                                                                               \
    X(replayed_frames)                                                                             \
    X(replay_skipped_committed)                                                                    \
    X(artifacts_received)                                                                          \
    X(artifacts_uploaded)                                                                          \
    X(artifacts_failed)                                                                            \
    X(artifacts_changed)                                                                           \
    X(artifact_spool_full)                                                                         \
    X(artifact_retries)                                                                            \
    X(artifacts_pending)                                                                           \
    X(artifact_bytes_uploaded)                                                                     \
    X(errors_to_clients)                                                                           \
    X(errors_undeliverable)                                                                        \
    X(rows_per_sec)                                                                                \
    X(flushes)                                                                                     \
    X(flushes_refused)                                                                             \
    X(uptime_s)

struct stats {
#define STATS_FIELD(name) uint64_t name;
    STATS_COUNTERS(STATS_FIELD)
#undef STATS_FIELD
};

extern struct stats stats;

/* Names in struct order; values_out must hold stats_count() entries. */
size_t stats_count(void);
const char *const *stats_names(void);
void stats_values(uint64_t *values_out);

#endif
