/* Real mode -> 32-bit protected mode -> long mode, the way Linux's SMP
 * trampoline (arch/x86/realmode/rm/trampoline_64.S) does it.
 * Loaded at 0x10000 and entered at 1000:0000 in real mode. The test builds
 * identity-mapped 4-level page tables at 0x1000. */
	.code16
start:
	cli
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	gdt_desc - start
	lidtl	idt_desc - start
	mov	%cr0, %ebx		/* (only MOV and system instructions here) */
	mov	$0x11, %eax		/* ET | PE */
	mov	%eax, %cr0
	ljmpl	$0x08, $pm32

	.code32
pm32:
	mov	$0x18, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$0x90000, %esp
	mov	$0x20, %eax		/* PAE */
	mov	%eax, %cr4
	mov	$0x1000, %eax
	mov	%eax, %cr3
	mov	$0xc0000080, %ecx
	mov	$0x901, %eax		/* NXE | LME | SCE */
	mov	$0, %edx
	wrmsr
	mov	$0x80050033, %eax	/* PG WP NE ET MP PE, like CR0_STATE */
	mov	%eax, %cr0
	/* Compatibility mode now: still 32-bit code. */
	mov	$0xc0000080, %ecx
	rdmsr
	mov	%eax, %esi		/* EFER with LMA, seen from compat mode */
	ljmpl	$0x10, $lm64

	.code64
lm64:
	mov	$0, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	movabs	$0x1122334455667788, %rax
	lea	(%rip), %rdi
	hlt

	.balign 8
gdt:
	.quad	0
	.quad	0x00cf9b000000ffff	/* 0x08: 32-bit code */
	.quad	0x00af9b000000ffff	/* 0x10: 64-bit code */
	.quad	0x00cf93000000ffff	/* 0x18: data */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt
idt_desc:
	.word	0
	.long	0
