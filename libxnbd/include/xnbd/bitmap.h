/* xnbd/bitmap.h - a persistent bitmap of blocks, one bit per block.
 *
 * The file format is in doc/bitmap-format.md: a 4096-byte header (magic,
 * version, block size, block count, image size, checksum) and a body in
 * which block i is bit (i % 8) of byte (i / 8), least significant bit
 * first, so the file reads the same on every host.
 *
 * Durability is the caller's to order, and this API makes the order
 * explicit: xnbd_bitmap_set() changes memory only; xnbd_bitmap_stage()
 * takes the bits set so far, and xnbd_bitmap_write_staged() writes exactly
 * those and syncs the file.  A proxy syncs its cache data between the two
 * calls, so a bit on disk never vouches for data that may not have landed.
 * Functions other than xnbd_bitmap_write_staged() belong to one thread.
 */
#ifndef XNBD_BITMAP_H
#define XNBD_BITMAP_H

#include <stdint.h>

#include "xnbd/common.h"

#ifdef __cplusplus
extern "C" {
#endif

struct xnbd_bitmap;

/* Flags of xnbd_bitmap_open(). */
#define XNBD_BITMAP_CLEAR (1U << 0) /* start with every bit clear */

/* Open the bitmap file at `path` for an image of `image_size` bytes in
 * blocks of `block_size` bytes (a power of two, 512 to 1 MiB), creating
 * it (all clear) if it does not exist.  An existing file is reused, its
 * bits kept unless XNBD_BITMAP_CLEAR.  The open bitmap holds an exclusive
 * flock(2) on the file until xnbd_bitmap_close().  Returns 0; -EBUSY when
 * another open bitmap (in this process or another) holds it, the file then
 * untouched; -EBADMSG when the file is not an xNBD bitmap or is damaged;
 * -EINVAL when it describes another block size or image size (or the
 * arguments are bad); -ENOMEM; or the negative errno of open/read/write. */
XNBD_EXPORT int xnbd_bitmap_open(const char *path, uint64_t image_size,
                                 uint32_t block_size, unsigned flags,
                                 struct xnbd_bitmap **out);

/* Number of blocks the bitmap covers. */
XNBD_EXPORT uint64_t xnbd_bitmap_blocks(const struct xnbd_bitmap *bm);

/* Is block i set?  (0 or 1; blocks past the end read as 0.) */
XNBD_EXPORT int xnbd_bitmap_test(const struct xnbd_bitmap *bm, uint64_t i);

/* Set block i in memory; it reaches the file with the next stage and
 * write.  Blocks past the end are ignored. */
XNBD_EXPORT void xnbd_bitmap_set(struct xnbd_bitmap *bm, uint64_t i);

/* Number of set blocks. */
XNBD_EXPORT uint64_t xnbd_bitmap_count(const struct xnbd_bitmap *bm);

/* The first clear block at or after `from`, or the block count if none. */
XNBD_EXPORT uint64_t xnbd_bitmap_next_clear(const struct xnbd_bitmap *bm,
                                            uint64_t from);

/* The first set block at or after `from`, or the block count if none. */
XNBD_EXPORT uint64_t xnbd_bitmap_next_set(const struct xnbd_bitmap *bm,
                                          uint64_t from);

/* Take a copy of the bits set since the last stage, for
 * xnbd_bitmap_write_staged().  Cheap; call it on the bitmap's thread once
 * the data those bits vouch for has been written (not necessarily synced).
 * Returns the number of pages of the file staged. */
XNBD_EXPORT uint64_t xnbd_bitmap_stage(struct xnbd_bitmap *bm);

/* Write the staged bits to the file and sync it.  Blocking; may run on a
 * worker thread, one call at a time, while the bitmap's thread goes on
 * setting bits.  Sync the data the staged bits vouch for first.  Returns 0
 * or a negative errno (the staged bits then stay staged). */
XNBD_EXPORT int xnbd_bitmap_write_staged(struct xnbd_bitmap *bm);

/* Close the file and free the bitmap; bits not written are lost, by
 * design.  Accepts NULL. */
XNBD_EXPORT void xnbd_bitmap_close(struct xnbd_bitmap *bm);

#ifdef __cplusplus
}
#endif

#endif
