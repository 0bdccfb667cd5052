/* edge_error.h — libnora_edge's thread-local last-error message (internal; shared by every edge source file).
 *
 * Data flow: a failing call --nora_edge_priv_fail(status, printf format, ...)--> the calling thread's message
 * buffer (truncated to NORA_EDGE_MSG_LEN - 1 bytes) + the status it returns --nora_edge_last_error()--> the
 * caller. A successful call leaves the message alone (errno-like): read it only after a call that failed.
 * Callable from C and C++ (extern "C"); the symbols are hidden in the shared library (-fvisibility=hidden) and
 * carry the nora_edge_priv_ prefix in the static one.
 */
#ifndef NORA_EDGE_ERROR_H
#define NORA_EDGE_ERROR_H

#include "nora_edge.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NORA_EDGE_MSG_LEN 512

#if defined(__GNUC__)
#define NORA_EDGE_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define NORA_EDGE_PRINTF(f, a)
#endif

/* Set the calling thread's message (printf-style) and return `status` (so: `return nora_edge_priv_fail(...)`). */
nora_edge_status nora_edge_priv_fail(nora_edge_status status, const char *fmt, ...) NORA_EDGE_PRINTF(2, 3);

/* Empty the calling thread's message. */
void nora_edge_priv_clear_error(void);

#ifdef __cplusplus
}
#endif

#endif /* NORA_EDGE_ERROR_H */
