/* words.c - percent-encoded words, as the control protocol writes them
 * (doc/control-protocol.md, "Lines and words"), for the export list file.
 * The library's codec is private to it; these few lines are the wrapper's
 * own copy of the rules, not of the code. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "wrapper.h"

static int escaped(unsigned char c)
{
	return c <= 0x20 || c == '%' || c >= 0x7f;
}

size_t word_len(const char *s)
{
	size_t n = 0;
	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		n += escaped(*p) ? 3 : 1;
	return n;
}

int word_append(char **buf, size_t *len, size_t *cap, const char *s)
{
	size_t need = *len + strlen(s) * 3 + 2;
	if (need > *cap) {
		size_t c = *cap ? *cap : 256;
		while (c < need)
			c *= 2;
		char *n = realloc(*buf, c);
		if (!n)
			return -ENOMEM;
		*buf = n;
		*cap = c;
	}
	static const char hex[] = "0123456789ABCDEF";
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (escaped(*p)) {
			(*buf)[(*len)++] = '%';
			(*buf)[(*len)++] = hex[*p >> 4];
			(*buf)[(*len)++] = hex[*p & 15];
		} else {
			(*buf)[(*len)++] = (char)*p;
		}
	}
	(*buf)[*len] = '\0';
	return 0;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decode the word at w (ending at a space or NUL) in place; returns a
 * pointer to the byte after it in the source (NULL at the end of the
 * line), or sets *bad when it is badly encoded. */
static char *decode(char *w, int *bad)
{
	char *src = w, *dst = w;
	while (*src && *src != ' ') {
		unsigned char c = (unsigned char)*src;
		if (c <= 0x20 || c >= 0x7f) {
			*bad = 1;
			return NULL;
		}
		if (c == '%') {
			int h = hexval(src[1]), l = h < 0 ? -1 : hexval(src[2]);
			if (h < 0 || l < 0 || (h == 0 && l == 0)) {
				*bad = 1;
				return NULL;
			}
			*dst++ = (char)(h << 4 | l);
			src += 3;
		} else {
			*dst++ = *src++;
		}
	}
	char *next = *src ? src + 1 : NULL; /* read before dst overwrites it */
	*dst = '\0';
	return next;
}

int words_split(char *line, char **argv, int max)
{
	int n = 0;
	char *p = line;
	for (;;) {
		if (n == max)
			return -1;
		argv[n++] = p;
		int bad = 0;
		char *next = decode(p, &bad);
		if (bad)
			return -1;
		if (!next)
			return n;
		p = next; /* past the single space */
	}
}
