/* ctlwire.h - the words and error names of the control protocol (private).
 *
 * Notes on the design: like wire.h for NBD, this is the control channel's
 * codec without I/O, shared by the server (control.c) and the blocking
 * client (control_client.c), and tested on its own.  A word is
 * percent-encoded so that it never holds a space (the separator), a
 * newline (the terminator) or any other byte a terminal or a shell script
 * could mangle: on the wire every byte of a line is 0x21..0x7e, or a space
 * between words, or the final newline.  See doc/control-protocol.md.
 */
#ifndef XNBD_CTLWIRE_H
#define XNBD_CTLWIRE_H

#include <stdbool.h>
#include <stddef.h>

/* Most words in one line; more are refused with E2BIG.  A line of
 * XNBD_CONTROL_MAX_LINE bytes could otherwise hold 8192 empty words, and
 * each side would need an argv that large. */
#define XNBD__CTL_MAX_WORDS 256

/* Is this byte sent as %XX? */
static inline bool xnbd__ctl_escaped(unsigned char c)
{
	return c <= 0x20 || c == '%' || c >= 0x7f;
}

/* Length of the encoding of the NUL-terminated string s. */
size_t xnbd__ctl_encoded_len(const char *s);

/* Encode s into dst, which has room for xnbd__ctl_encoded_len(s) bytes;
 * returns the bytes written (no NUL is added). */
size_t xnbd__ctl_encode(char *dst, const char *s);

/* The longest prefix of s, in bytes, whose encoding takes at most cap
 * bytes, shortened so that it does not cut a UTF-8 sequence in two.  Used
 * to truncate human-readable messages to what a line can hold. */
size_t xnbd__ctl_fit(const char *s, size_t cap);

/* Decode the len bytes at src into dst and NUL-terminate it; dst may be
 * src (the result is never longer).  Returns the decoded length, or
 * -EINVAL for a byte outside 0x21..0x7e, a '%' not followed by two hex
 * digits, or %00 (a NUL cannot travel in a C string). */
int xnbd__ctl_decode(char *dst, const char *src, size_t len);

/* Split a line (without its newline, NUL-terminated at line[len]) into
 * words separated by single spaces and decode each in place.  Two spaces in
 * a row, or a space at either end, delimit an empty word.  argv receives
 * up to max pointers into line, then a NULL (argv has max + 1 slots).
 * Returns the number of words (at least 1), -EINVAL for a badly encoded
 * word or -E2BIG for more than max words. */
int xnbd__ctl_split(char *line, size_t len, char **argv, int max);

/* The name of a negative errno ("EINVAL" for -EINVAL), or NULL when the
 * protocol has no name for it. */
const char *xnbd__ctl_errno_name(int err);

/* The negative errno of a name; -EIO for a name this side does not know. */
int xnbd__ctl_errno_value(const char *name);

#endif
