/* bitmap.c - the persistent block bitmap (see xnbd/bitmap.h and
 * doc/bitmap-format.md).
 *
 * Notes on the design: the bits live in memory as the body's bytes, so a
 * page of memory is a page of the file.  A second, small bitmap marks the
 * pages changed since the last stage.  Staging copies those pages into a
 * staging buffer and records them; writing pwrites the recorded pages and
 * fdatasyncs.  The staging buffer, the list and the write are touched by
 * one thread at a time (the writer), after the stage that filled them, so
 * setting bits never waits for the disk.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "xnbd/bitmap.h"

#include "backend.h"
#include "wire.h"

#define HDR_SIZE 4096U
#define PAGE 4096U
#define VERSION 1U
static const uint8_t magic[8] = {'X', 'N', 'B', 'D', 'B', 'M', 'P', 0};

struct xnbd_bitmap {
	int fd;
	uint64_t blocks;
	uint64_t body;  /* body bytes */
	uint64_t pages; /* body pages */
	uint8_t *bits;
	uint8_t *dirty;  /* one bit per body page, since the last stage */
	uint8_t *inlist; /* one bit per body page: in `list` */
	uint8_t *staged; /* staging copy of the body */
	uint64_t *list;  /* staged page numbers */
	uint64_t nlist;
	uint64_t count;
};

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* Header: magic[8] version[4] header_size[4] block_size[4] reserved[4]
 * block_count[8] image_size[8] checksum[8] (of the bytes before it). */
static void make_header(uint8_t *h, uint32_t bs, uint64_t blocks, uint64_t size)
{
	memset(h, 0, HDR_SIZE);
	memcpy(h, magic, 8);
	xnbd__put32(h + 8, VERSION);
	xnbd__put32(h + 12, HDR_SIZE);
	xnbd__put32(h + 16, bs);
	xnbd__put64(h + 24, blocks);
	xnbd__put64(h + 32, size);
	xnbd__put64(h + 40, fnv1a(h, 40));
}

static int full_io(int fd, void *buf, size_t n, off_t off, bool wr)
{
	uint8_t *p = buf;
	while (n) {
		ssize_t r = wr ? pwrite(fd, p, n, off) : pread(fd, p, n, off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			return -EBADMSG; /* short file */
		p += r;
		n -= (size_t)r;
		off += r;
	}
	return 0;
}

static uint64_t popcount_bytes(const uint8_t *p, uint64_t n)
{
	uint64_t c = 0;
	for (uint64_t i = 0; i < n; i++)
		c += (uint64_t)__builtin_popcount(p[i]);
	return c;
}

int xnbd_bitmap_open(const char *path, uint64_t image_size, uint32_t block_size,
                     unsigned flags, struct xnbd_bitmap **out)
{
	if (!path || block_size < 512 || block_size > (1U << 20) ||
	    (block_size & (block_size - 1)))
		return -EINVAL;
	uint64_t blocks = (image_size + block_size - 1) / block_size;
	struct xnbd_bitmap *bm = calloc(1, sizeof(*bm));
	if (!bm)
		return -ENOMEM;
	bm->fd = -1;
	bm->blocks = blocks;
	bm->body = (blocks + 7) / 8;
	bm->pages = (bm->body + PAGE - 1) / PAGE;
	size_t alloc = bm->pages ? bm->pages * PAGE : PAGE;
	bm->bits = calloc(1, alloc);
	bm->staged = calloc(1, alloc);
	bm->dirty = calloc(1, bm->pages / 8 + 1);
	bm->inlist = calloc(1, bm->pages / 8 + 1);
	bm->list = calloc(bm->pages + 1, sizeof(uint64_t));
	uint8_t *h = malloc(HDR_SIZE);
	int r =
	    (bm->bits && bm->staged && bm->dirty && bm->inlist && bm->list && h)
	        ? 0
	        : -ENOMEM;
	if (r == 0) {
		bm->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
		if (bm->fd < 0)
			r = -errno;
	}
	/* One owner at a time: a second proxy on the same files (started
	 * by mistake, with --clear-bitmap perhaps) must not rewrite the
	 * bits under the first.  flock, not fcntl: the lock belongs to the
	 * open file, so it survives a daemon's fork. */
	if (r == 0 && flock(bm->fd, LOCK_EX | LOCK_NB) != 0)
		r = errno == EWOULDBLOCK ? -EBUSY : -errno;
	struct stat st;
	if (r == 0 && fstat(bm->fd, &st))
		r = -errno;
	if (r == 0 && st.st_size == 0) {
		/* New file: header and an all-clear body, synced. */
		make_header(h, block_size, blocks, image_size);
		r = full_io(bm->fd, h, HDR_SIZE, 0, true);
		if (r == 0 && ftruncate(bm->fd, (off_t)(HDR_SIZE + bm->body)))
			r = -errno;
		if (r == 0 && fsync(bm->fd))
			r = -errno;
	} else if (r == 0) {
		if ((uint64_t)st.st_size < HDR_SIZE)
			r = -EBADMSG;
		if (r == 0)
			r = full_io(bm->fd, h, HDR_SIZE, 0, false);
		if (r == 0 && (memcmp(h, magic, 8) != 0 ||
		               xnbd__get32(h + 8) != VERSION ||
		               xnbd__get32(h + 12) != HDR_SIZE ||
		               xnbd__get64(h + 40) != fnv1a(h, 40)))
			r = -EBADMSG;
		/* Reserved bytes are zero in every file we write: anything else is
		 * damage (or a newer format, which must change the version). */
		if (r == 0 && (xnbd__get32(h + 20) != 0 ||
		               !xnbd__is_zero(h + 48, HDR_SIZE - 48)))
			r = -EBADMSG;
		if (r == 0 && (xnbd__get32(h + 16) != block_size ||
		               xnbd__get64(h + 24) != blocks ||
		               xnbd__get64(h + 32) != image_size))
			r = -EINVAL;
		if (r == 0 && (uint64_t)st.st_size != HDR_SIZE + bm->body)
			r = -EBADMSG;
		if (r == 0 && !(flags & XNBD_BITMAP_CLEAR) && bm->body)
			r = full_io(bm->fd, bm->bits, bm->body, HDR_SIZE,
			            false);
		if (r == 0 && (flags & XNBD_BITMAP_CLEAR) && bm->body) {
			r = full_io(bm->fd, bm->bits, bm->body, HDR_SIZE, true);
			if (r == 0 && fdatasync(bm->fd))
				r = -errno;
		}
		/* Bits past the last block must be clear; a file that says
		 * otherwise was not written by us. */
		if (r == 0 && bm->blocks % 8 &&
		    (bm->bits[bm->body - 1] >> (bm->blocks % 8)))
			r = -EBADMSG;
	}
	free(h);
	if (r) {
		xnbd_bitmap_close(bm);
		return r;
	}
	bm->count = popcount_bytes(bm->bits, bm->body);
	*out = bm;
	return 0;
}

bool xnbd__bitmap_file_is_ours(int fd)
{
	uint8_t h[48];
	if (full_io(fd, h, sizeof(h), 0, false) != 0)
		return false;
	return memcmp(h, magic, 8) == 0 && xnbd__get32(h + 8) == VERSION &&
	       xnbd__get32(h + 12) == HDR_SIZE &&
	       xnbd__get64(h + 40) == fnv1a(h, 40);
}

uint64_t xnbd_bitmap_blocks(const struct xnbd_bitmap *bm)
{
	return bm->blocks;
}

int xnbd_bitmap_test(const struct xnbd_bitmap *bm, uint64_t i)
{
	return i < bm->blocks && ((bm->bits[i / 8] >> (i % 8)) & 1);
}

void xnbd_bitmap_set(struct xnbd_bitmap *bm, uint64_t i)
{
	if (i >= bm->blocks || xnbd_bitmap_test(bm, i))
		return;
	bm->bits[i / 8] |= (uint8_t)(1U << (i % 8));
	bm->count++;
	uint64_t page = (i / 8) / PAGE;
	bm->dirty[page / 8] |= (uint8_t)(1U << (page % 8));
}

uint64_t xnbd_bitmap_count(const struct xnbd_bitmap *bm)
{
	return bm->count;
}

/* The first block at or after `from` whose bit is `set`, or the block
 * count; whole bytes of the other value are skipped. */
static uint64_t next_bit(const struct xnbd_bitmap *bm, uint64_t from, int set)
{
	uint8_t other = set ? 0 : 0xff;
	uint64_t i = from;
	while (i < bm->blocks) {
		if (i % 8 == 0 && bm->bits[i / 8] == other) {
			i += 8;
			continue;
		}
		if (xnbd_bitmap_test(bm, i) == set)
			return i;
		i++;
	}
	return bm->blocks;
}

uint64_t xnbd_bitmap_next_clear(const struct xnbd_bitmap *bm, uint64_t from)
{
	return next_bit(bm, from, 0);
}

uint64_t xnbd_bitmap_next_set(const struct xnbd_bitmap *bm, uint64_t from)
{
	return next_bit(bm, from, 1);
}

uint64_t xnbd_bitmap_stage(struct xnbd_bitmap *bm)
{
	uint64_t staged = 0;
	for (uint64_t p = 0; p < bm->pages; p++) {
		if (bm->dirty[p / 8] == 0) {
			p |= 7; /* a clear byte: skip its eight pages */
			continue;
		}
		if (!(bm->dirty[p / 8] & (1U << (p % 8))))
			continue;
		bm->dirty[p / 8] &= (uint8_t) ~(1U << (p % 8));
		uint64_t len =
		    bm->body - p * PAGE < PAGE ? bm->body - p * PAGE : PAGE;
		memcpy(bm->staged + p * PAGE, bm->bits + p * PAGE, len);
		/* A page staged twice before a write is listed once. */
		if (!(bm->inlist[p / 8] & (1U << (p % 8)))) {
			bm->inlist[p / 8] |= (uint8_t)(1U << (p % 8));
			bm->list[bm->nlist++] = p;
		}
		staged++;
	}
	return staged;
}

int xnbd_bitmap_write_staged(struct xnbd_bitmap *bm)
{
	for (uint64_t k = 0; k < bm->nlist; k++) {
		uint64_t p = bm->list[k];
		uint64_t len =
		    bm->body - p * PAGE < PAGE ? bm->body - p * PAGE : PAGE;
		int r = full_io(bm->fd, bm->staged + p * PAGE, len,
		                (off_t)(HDR_SIZE + p * PAGE), true);
		if (r)
			return r;
	}
	if (bm->nlist && fdatasync(bm->fd))
		return -errno;
	for (uint64_t k = 0; k < bm->nlist; k++)
		bm->inlist[bm->list[k] / 8] = 0;
	bm->nlist = 0;
	return 0;
}

void xnbd_bitmap_close(struct xnbd_bitmap *bm)
{
	if (!bm)
		return;
	if (bm->fd >= 0)
		close(bm->fd);
	free(bm->bits);
	free(bm->staged);
	free(bm->dirty);
	free(bm->inlist);
	free(bm->list);
	free(bm);
}
