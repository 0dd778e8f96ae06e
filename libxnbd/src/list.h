/* list.h - an intrusive doubly linked list (private). */
#ifndef XNBD_LIST_H
#define XNBD_LIST_H

#include <stddef.h>

struct xnbd_list {
	struct xnbd_list *prev, *next;
};

#define xnbd_container_of(ptr, type, member) \
	((type *)(void *)((char *)(ptr)-offsetof(type, member)))

static inline void xnbd_list_init(struct xnbd_list *l)
{
	l->prev = l->next = l;
}

static inline int xnbd_list_empty(const struct xnbd_list *l)
{
	return l->next == l;
}

/* Insert elm after pos. */
static inline void xnbd_list_insert(struct xnbd_list *pos,
                                    struct xnbd_list *elm)
{
	elm->prev = pos;
	elm->next = pos->next;
	pos->next->prev = elm;
	pos->next = elm;
}

static inline void xnbd_list_remove(struct xnbd_list *elm)
{
	elm->prev->next = elm->next;
	elm->next->prev = elm->prev;
	elm->prev = elm->next = elm;
}

/* Move every element of src to the end of dst; src is left empty. */
static inline void xnbd_list_splice(struct xnbd_list *dst,
                                    struct xnbd_list *src)
{
	if (src->next == src)
		return;
	src->next->prev = dst->prev;
	dst->prev->next = src->next;
	src->prev->next = dst;
	dst->prev = src->prev;
	src->next = src->prev = src;
}

#define xnbd_list_for_each(it, head) \
	for (struct xnbd_list *it = (head)->next; it != (head); it = it->next)

#endif
