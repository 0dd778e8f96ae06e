/* test-bitmap.c - the persistent block bitmap: format, reuse, refusal of
 * foreign or mismatched files, and the stage/write durability order. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "xnbd/bitmap.h"
#include "unit-main.h"

static char dir[] = "/tmp/xnbd-bitmap-XXXXXX";
static char path[256];

static void setup(void)
{
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/bm", dir);
}

static void teardown(void)
{
	unlink(path);
	rmdir(dir);
	strcpy(dir, "/tmp/xnbd-bitmap-XXXXXX");
}

static off_t file_size(void)
{
	struct stat st;
	ck_assert_int_eq(stat(path, &st), 0);
	return st.st_size;
}

static int file_byte(off_t off)
{
	int fd = open(path, O_RDONLY);
	unsigned char c = 0xee;
	ck_assert_int_eq(pread(fd, &c, 1, off), 1);
	close(fd);
	return c;
}

START_TEST(create_layout)
{
	struct xnbd_bitmap *bm;
	/* 10 blocks and a bit: 11 blocks, 2 body bytes. */
	ck_assert_int_eq(xnbd_bitmap_open(path, 10 * 4096 + 1, 4096, 0, &bm),
	                 0);
	ck_assert_uint_eq(xnbd_bitmap_blocks(bm), 11);
	ck_assert_uint_eq(xnbd_bitmap_count(bm), 0);
	ck_assert_int_eq(file_size(), 4096 + 2);
	ck_assert_int_eq(file_byte(0), 'X');
	ck_assert_int_eq(file_byte(7), 0);
	xnbd_bitmap_close(bm);
}
END_TEST

START_TEST(bits_are_lsb_first_and_durable_after_write)
{
	struct xnbd_bitmap *bm;
	ck_assert_int_eq(xnbd_bitmap_open(path, 100 * 4096, 4096, 0, &bm), 0);
	xnbd_bitmap_set(bm, 0);
	xnbd_bitmap_set(bm, 9);
	xnbd_bitmap_set(bm, 9);    /* twice: counted once */
	xnbd_bitmap_set(bm, 1000); /* past the end: ignored */
	ck_assert_uint_eq(xnbd_bitmap_count(bm), 2);
	ck_assert_int_eq(xnbd_bitmap_test(bm, 9), 1);
	ck_assert_int_eq(xnbd_bitmap_test(bm, 8), 0);
	/* Not on disk before stage + write. */
	ck_assert_int_eq(file_byte(4096), 0);
	ck_assert_uint_eq(xnbd_bitmap_stage(bm), 1);
	ck_assert_int_eq(file_byte(4096), 0);
	/* Bits set after the stage are not part of this write. */
	xnbd_bitmap_set(bm, 2);
	ck_assert_int_eq(xnbd_bitmap_write_staged(bm), 0);
	ck_assert_int_eq(file_byte(4096), 0x01);
	ck_assert_int_eq(file_byte(4097), 0x02);
	ck_assert_uint_eq(xnbd_bitmap_stage(bm), 1);
	ck_assert_int_eq(xnbd_bitmap_write_staged(bm), 0);
	ck_assert_int_eq(file_byte(4096), 0x05);
	xnbd_bitmap_close(bm);

	/* Reopened: the written bits are back. */
	ck_assert_int_eq(xnbd_bitmap_open(path, 100 * 4096, 4096, 0, &bm), 0);
	ck_assert_uint_eq(xnbd_bitmap_count(bm), 3);
	ck_assert_int_eq(xnbd_bitmap_test(bm, 2), 1);
	ck_assert_uint_eq(xnbd_bitmap_next_clear(bm, 0), 1);
	ck_assert_uint_eq(xnbd_bitmap_next_clear(bm, 9), 10);
	ck_assert_uint_eq(xnbd_bitmap_next_set(bm, 0), 0);
	ck_assert_uint_eq(xnbd_bitmap_next_set(bm, 1), 2);
	ck_assert_uint_eq(xnbd_bitmap_next_set(bm, 3), 9); /* across a byte */
	ck_assert_uint_eq(xnbd_bitmap_next_set(bm, 10), 100); /* none: blocks */
	xnbd_bitmap_close(bm);

	/* Reopened with CLEAR: nothing set, in memory and on disk. */
	ck_assert_int_eq(
	    xnbd_bitmap_open(path, 100 * 4096, 4096, XNBD_BITMAP_CLEAR, &bm),
	    0);
	ck_assert_uint_eq(xnbd_bitmap_count(bm), 0);
	ck_assert_int_eq(file_byte(4096), 0);
	xnbd_bitmap_close(bm);
}
END_TEST

/* One owner at a time: a second open, even with CLEAR, is refused with
 * -EBUSY and leaves the file alone; after the first closes, it opens. */
START_TEST(a_bitmap_in_use_is_refused)
{
	struct xnbd_bitmap *bm, *other = NULL;
	ck_assert_int_eq(xnbd_bitmap_open(path, 100 * 4096, 4096, 0, &bm), 0);
	xnbd_bitmap_set(bm, 3);
	ck_assert_uint_eq(xnbd_bitmap_stage(bm), 1);
	ck_assert_int_eq(xnbd_bitmap_write_staged(bm), 0);
	ck_assert_int_eq(file_byte(4096), 0x08);
	ck_assert_int_eq(
	    xnbd_bitmap_open(path, 100 * 4096, 4096, XNBD_BITMAP_CLEAR, &other),
	    -EBUSY);
	ck_assert_ptr_null(other);
	ck_assert_int_eq(file_byte(4096), 0x08);
	xnbd_bitmap_close(bm);
	ck_assert_int_eq(xnbd_bitmap_open(path, 100 * 4096, 4096, 0, &other),
	                 0);
	ck_assert_uint_eq(xnbd_bitmap_count(other), 1);
	xnbd_bitmap_close(other);
}
END_TEST

START_TEST(unwritten_bits_are_lost_on_close)
{
	struct xnbd_bitmap *bm;
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 4096, 0, &bm), 0);
	xnbd_bitmap_set(bm, 5);
	xnbd_bitmap_stage(bm); /* staged, never written: as after a crash */
	xnbd_bitmap_close(bm);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 4096, 0, &bm), 0);
	ck_assert_uint_eq(xnbd_bitmap_count(bm), 0);
	xnbd_bitmap_close(bm);
}
END_TEST

START_TEST(many_pages)
{
	struct xnbd_bitmap *bm;
	uint64_t blocks = 3 * 4096 * 8 + 5; /* body spans four pages */
	ck_assert_int_eq(xnbd_bitmap_open(path, blocks * 512, 512, 0, &bm), 0);
	for (uint64_t i = 0; i < blocks; i += 4099)
		xnbd_bitmap_set(bm, i);
	xnbd_bitmap_set(bm, blocks - 1);
	ck_assert_uint_eq(xnbd_bitmap_stage(bm), 4);
	ck_assert_int_eq(xnbd_bitmap_write_staged(bm), 0);
	uint64_t n = xnbd_bitmap_count(bm);
	xnbd_bitmap_close(bm);
	ck_assert_int_eq(xnbd_bitmap_open(path, blocks * 512, 512, 0, &bm), 0);
	ck_assert_uint_eq(xnbd_bitmap_count(bm), n);
	for (uint64_t i = 0; i < blocks; i += 4099)
		ck_assert_int_eq(xnbd_bitmap_test(bm, i), 1);
	ck_assert_int_eq(xnbd_bitmap_test(bm, blocks - 1), 1);
	ck_assert_int_eq(xnbd_bitmap_test(bm, 1), 0);
	xnbd_bitmap_close(bm);
}
END_TEST

START_TEST(refuses_mismatch_and_foreign_files)
{
	struct xnbd_bitmap *bm;
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 4096, 0, &bm), 0);
	xnbd_bitmap_close(bm);
	/* Another image size or block size: refused, file untouched. */
	ck_assert_int_eq(xnbd_bitmap_open(path, 65 * 4096, 4096, 0, &bm),
	                 -EINVAL);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 512, 0, &bm),
	                 -EINVAL);
	ck_assert_int_eq(file_size(), 4096 + 8);
	/* Bad arguments. */
	ck_assert_int_eq(xnbd_bitmap_open(path, 4096, 1000, 0, &bm), -EINVAL);
	ck_assert_int_eq(xnbd_bitmap_open(NULL, 4096, 4096, 0, &bm), -EINVAL);

	/* A damaged header (checksum) is refused. */
	int fd = open(path, O_WRONLY);
	ck_assert_int_eq(pwrite(fd, "\x7f", 1, 20), 1);
	close(fd);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 4096, 0, &bm),
	                 -EBADMSG);

	/* Damage in the reserved, unchecksummed part of the header too. */
	unlink(path);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 4096, 0, &bm), 0);
	xnbd_bitmap_close(bm);
	fd = open(path, O_WRONLY);
	ck_assert_int_eq(pwrite(fd, "garbage!", 8, 100), 8);
	close(fd);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 4096, 0, &bm),
	                 -EBADMSG);
	ck_assert_int_eq(
	    xnbd_bitmap_open(path, 64 * 4096, 4096, XNBD_BITMAP_CLEAR, &bm),
	    -EBADMSG);

	/* Something else entirely: refused, not overwritten. */
	fd = open(path, O_WRONLY | O_TRUNC);
	ck_assert_int_eq(write(fd, "hello world, not a bitmap", 25), 25);
	close(fd);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096, 4096, 0, &bm),
	                 -EBADMSG);
	ck_assert_int_eq(file_size(), 25);

	/* A truncated body is refused. */
	unlink(path);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096 * 8, 4096, 0, &bm),
	                 0);
	xnbd_bitmap_close(bm);
	ck_assert_int_eq(truncate(path, 4096 + 10), 0);
	ck_assert_int_eq(xnbd_bitmap_open(path, 64 * 4096 * 8, 4096, 0, &bm),
	                 -EBADMSG);
}
END_TEST

START_TEST(empty_image)
{
	struct xnbd_bitmap *bm;
	ck_assert_int_eq(xnbd_bitmap_open(path, 0, 4096, 0, &bm), 0);
	ck_assert_uint_eq(xnbd_bitmap_blocks(bm), 0);
	ck_assert_uint_eq(xnbd_bitmap_next_clear(bm, 0), 0);
	ck_assert_uint_eq(xnbd_bitmap_stage(bm), 0);
	ck_assert_int_eq(xnbd_bitmap_write_staged(bm), 0);
	xnbd_bitmap_close(bm);
	ck_assert_int_eq(xnbd_bitmap_open(path, 0, 4096, 0, &bm), 0);
	xnbd_bitmap_close(bm);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("bitmap");
	TCase *tc = tcase_create("core");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, create_layout);
	tcase_add_test(tc, bits_are_lsb_first_and_durable_after_write);
	tcase_add_test(tc, unwritten_bits_are_lost_on_close);
	tcase_add_test(tc, a_bitmap_in_use_is_refused);
	tcase_add_test(tc, many_pages);
	tcase_add_test(tc, refuses_mismatch_and_foreign_files);
	tcase_add_test(tc, empty_image);
	suite_add_tcase(s, tc);
	return xnbd_test_run(s);
}
