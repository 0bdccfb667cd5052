/* sha256.h — a small self-contained SHA-256 (FIPS 180-4) for libnora_edge's bundle verification (internal).
 *
 * Data flow: bytes --nora_edge_priv_sha256_update (any split)--> 64-byte blocks compressed into the state
 * --nora_edge_priv_sha256_final (padding: 0x80, zeros, 64-bit big-endian bit length)--> 32-byte digest.
 * nora_edge_priv_sha256_file reads a file in 4 MiB chunks (like nora_edge/bundle.py's sha256_file) and writes
 * the lowercase hex digest the manifest records. Reference: FIPS 180-4, https://doi.org/10.6028/NIST.FIPS.180-4
 * (sections 4.1.2, 4.2.2, 5.1.1, 5.3.3, 6.2). Callable from C and C++; no allocation except the file buffer.
 */
#ifndef NORA_EDGE_SHA256_H
#define NORA_EDGE_SHA256_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nora_edge_sha256_ctx {
    uint32_t h[8];      /* chaining state */
    uint64_t total;     /* bytes hashed so far */
    uint8_t block[64];  /* pending partial block */
    size_t used;        /* bytes in block */
} nora_edge_sha256_ctx;

void nora_edge_priv_sha256_init(nora_edge_sha256_ctx *ctx);
void nora_edge_priv_sha256_update(nora_edge_sha256_ctx *ctx, const void *data, size_t len);
/* Writes the 32-byte digest; the context must be re-initialised before reuse. */
void nora_edge_priv_sha256_final(nora_edge_sha256_ctx *ctx, uint8_t digest[32]);
/* Lowercase hex (64 chars + NUL) of a digest. */
void nora_edge_priv_sha256_hex(const uint8_t digest[32], char hex[65]);
/* Hex sha256 of a file read in 4 MiB chunks: 0 on success, -1 on an open/read/allocation failure (errno set). */
int nora_edge_priv_sha256_file(const char *path, char hex[65]);

#ifdef __cplusplus
}
#endif

#endif /* NORA_EDGE_SHA256_H */
