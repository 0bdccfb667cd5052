/* edge_error.c — the thread-local message behind nora_edge_last_error() (see edge_error.h). */
#include "edge_error.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char ne_message[NORA_EDGE_MSG_LEN];

const char *nora_edge_last_error(void) { return ne_message; }

void nora_edge_priv_clear_error(void) { ne_message[0] = '\0'; }

nora_edge_status nora_edge_priv_fail(nora_edge_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(ne_message, sizeof ne_message, fmt, ap) < 0) {
        ne_message[0] = '\0';
    }
    va_end(ap);
    return status;
}
